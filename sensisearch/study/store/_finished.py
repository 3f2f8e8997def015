"""A finished run read back from its storage: for ``sensisearch report`` and ``sensisearch export``.

Neither command runs a trial, calibrates or builds: ``report`` reloads the
study's settings (stored by every run) to rewrite the results, ``export`` hands
one trial's deployable ONNX to the deployment tools.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import optuna

from sensisearch.errors import SensisearchError
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._storage import mask_url, open_storage
from sensisearch.study.store._results import trial_file

if TYPE_CHECKING:
    from sensisearch.export import ExportedTrial
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

WINNER = "winner"
# Reading a finished study sends no heartbeats worth tuning; the storage API needs a value.
_READ_HEARTBEAT_SECONDS = 30


@dataclass(frozen=True)
class FinishedRun:
    out: Path
    storage_url: str
    study: optuna.Study

    @property
    def study_name(self) -> str:
        return self.study.study_name


def open_finished_run(run_dir: Path, storage: str | None = None, study_name: str | None = None) -> FinishedRun:
    """The study of ``run_dir`` (its ``study.db``, or ``storage``); the only study there unless ``study_name``."""
    run_dir = Path(run_dir)
    if storage is None:
        db = run_dir / "study.db"
        if not db.is_file():
            raise SensisearchError(f"{db}: no study here; pass the run's --out folder, or --storage URL and --study-name")
        storage = f"sqlite:///{db.resolve()}"
    rdb = open_storage(storage, _READ_HEARTBEAT_SECONDS)
    names = [s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)]
    if study_name is None:
        if len(names) != 1:
            raise SensisearchError(
                f"--storage {mask_url(storage)} holds {len(names)} studies ({', '.join(names) or 'none'}); pass --study-name"
            )
        study_name = names[0]
    elif study_name not in names:
        raise SensisearchError(f"--study-name {study_name}: not in {mask_url(storage)} (studies: {', '.join(names) or 'none'})")
    return FinishedRun(run_dir, storage, optuna.load_study(study_name=study_name, storage=rdb))


def run_settings(run: FinishedRun, file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> StudySettings:
    """The settings the study was last run with, overridden by a study file and flags given now."""
    from sensisearch.study.store._worker import SETTINGS_ATTR
    from sensisearch.study.config._settings import flat_settings, merge_settings

    stored = run.study.user_attrs.get(SETTINGS_ATTR)
    if stored is None and not file_values and flags.get("model") is None and flags.get("example") is None:
        raise SensisearchError(
            f"study '{run.study_name}' in {mask_url(run.storage_url)} does not record its settings (made by an older "
            "version); pass the run's study file or flags, e.g. sensisearch report RUN_DIR --example digits"
        )
    # The stored storage URL is masked; the run is read from where it was opened. The stored settings are
    # nested (StudySettings.to_dict) or flat (earlier releases), and a study file's layer over them is flat.
    values = {k: v for k, v in flat_settings(stored or {}).items() if v is not None and k != "storage"}
    values.update(file_values)
    given = {k: v for k, v in flags.items() if v is not None}
    given.update(out=run.out, storage=run.storage_url, study_name=run.study_name)
    return merge_settings(values, given, None)


def trial_record(run: FinishedRun, which: str) -> TrialRecord:
    """Trial ``which`` (a number, or ``winner``: the trial in ``winner/config.json``), which must be complete."""
    if which == WINNER:
        config_path = run.out / "winner" / "config.json"
        if not config_path.is_file():
            raise SensisearchError(f"{config_path}: no winner recorded; run `sensisearch report {run.out}` or pass --trial N")
        number = int(json.loads(config_path.read_text())["trial"])
    else:
        try:
            number = int(which)
        except ValueError:
            raise SensisearchError(f"--trial {which}: give a trial number or 'winner'") from None
    trials = {t.number: t for t in run.study.get_trials(deepcopy=False)}
    if number not in trials:
        raise SensisearchError(f"--trial {number}: study '{run.study_name}' has trials 0-{max(trials, default=-1)}")
    record = TrialRecord.from_trial(trials[number])
    if record.state != "COMPLETE" or not record.deployable:
        raise SensisearchError(f"--trial {number}: the trial is {record.state.lower()} and has no deployable ONNX; pick a complete one")
    return record


def export_run_trial(
    run: FinishedRun, which: str, formats: Iterable[str], out_dir: Path | None = None, model: Path | None = None,
    shapes: str | list[str] | None = None, max_batch: int | None = None,
) -> ExportedTrial:
    """Hand trial ``which`` of ``run`` to the deployment tools (:func:`sensisearch.export.export_trial`)."""
    from sensisearch.backends.tensorrt.builder import parse_shapes
    from sensisearch.export import export_trial

    from sensisearch.export import ExportFormat

    record = trial_record(run, which)
    deployable = trial_file(record.deployable, run.out, record.number)
    fp32 = model or run.study.user_attrs.get("model_path")
    folder = out_dir or run.out / "export" / f"trial-{record.number:04d}"
    formats = list(formats)  # an unknown name is export_trial's to report
    # ModelOpt's command names calib.npy: without the samples it cannot run at all.
    modelopt = any(getattr(f, "value", f) == ExportFormat.MODELOPT.value for f in formats)
    calibration = trial_calibration_samples(run, record, model) if modelopt else None
    exported = export_trial(
        deployable,  # type: ignore[arg-type]
        {} if record.config is None else record.config.to_dict(), folder, formats=formats, fp32_model=fp32, shapes=parse_shapes(shapes) if shapes else None,
        max_batch=max_batch, calibration=calibration,
    )
    log.info("trial %d exported to %s", record.number, folder)
    return exported


def trial_calibration_samples(run: FinishedRun, record: TrialRecord, model: Path | None = None) -> np.ndarray | None:
    """The samples trial ``record`` calibrated on, preprocessed as the model takes them, as one array.

    The same set the study drew (the first ``samples`` of its seeded order over the
    calibration source), so ModelOpt calibrates on what the study did; bounded by that
    count. None (with a warning) when the trial has no INT8 layer or the calibration
    data cannot be read on this host.
    """
    from sensisearch.calibration.statistics import deterministic_order
    from sensisearch.study.config._inputs import calibration_source, resolve_inputs

    samples = 0 if record.config is None else int(record.config.calibration.samples or 0)
    if not samples or record.config is None or not record.config.uses_int8:
        return None
    try:
        settings = run_settings(run, {}, {"model": model} if model is not None else {})
        resolved = resolve_inputs(settings)
        if resolved.settings.data.calib_data is None:
            raise SensisearchError("the study records no --calib-data")
        source = calibration_source(resolved.settings, resolved.model, resolved.input_spec)
    except (SensisearchError, OSError) as exc:
        log.warning("modelopt: calib.npy not written (%s); write the study's calibration samples there yourself", exc)
        return None
    order = deterministic_order(source.size, resolved.settings.search.seed)[: min(samples, source.size)]
    batch = source.static_batch or 32
    arrays = [np.asarray(x) for x in source.batches(order, batch)]
    return np.ascontiguousarray(np.concatenate(arrays)[: len(order)])
