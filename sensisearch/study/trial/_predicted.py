"""Trial latency from a predictor instead of timing; what it means for the winner, the verdict and stage 2.

A study whose quantization profile is another backend's (``--profile
tensorrt`` on ONNX Runtime) scores exactly the target's Q/DQ graph, but timing that
graph here says nothing about the target. Such a trial is not timed: its latency
record comes from a :class:`~sensisearch.latency.LatencyPredictor`, a per-layer
latency table measured once on the target (``--latency-table FILE``), else the
documented MAC estimate. Every figure keeps the predictor's ``source`` and
``label`` so no report calls it "paired" or "measured"; a predicted speed-up has
no CI and none is shown. Stage 2 (``sensisearch verify RUN_DIR --backend B``)
builds the front on the target and says how well the prediction ranked it
(:func:`compare_predicted`).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sensisearch.errors import SensisearchError
from sensisearch.latency import SOURCE_ESTIMATE, SOURCE_PAIRED, SOURCE_TABLE, LatencyPredictor, MacEstimate
from sensisearch.quantize.config import Precision
from sensisearch.study.store._timing import PredictionCheck

if TYPE_CHECKING:
    import onnx
    import optuna

    from sensisearch.backends.base import Backend
    from sensisearch.model.analysis import ModelInfo
    from sensisearch.study.store._record import TrialRecord
    from sensisearch.study.config._settings import StudySettings

log = logging.getLogger(__name__)

COST_UNIT = "relative cost (FP32 = 1)"
"""The unit of an estimate's ``median_ms``: the MAC estimate over all-FP32's, unitless."""


# --------------------------------------------------------------------------- which predictor
def load_table(path: Path, model: onnx.ModelProto, info: ModelInfo, profile: str) -> LatencyPredictor:
    """``--latency-table FILE``, checked against this study's model, layers and quantization profile.

    Bound to the study's model (not the path stored in the table), so a worker on
    another host plans the same placements from its own copy.
    """
    from sensisearch.latency import load_latency_table

    if not Path(path).is_file():
        raise SensisearchError(f"--latency-table {path}: no such file; run `sensisearch latency-table` on the target first")
    table = load_latency_table(Path(path))
    if table.profile != profile:
        raise SensisearchError(
            f"--latency-table {path}: measured for quantization profile {table.profile}, the study uses {profile}; "
            f"pass --profile {table.profile} or measure a table for {profile}"
        )
    return table.bind(model, info)


def latency_predictor(
    settings: StudySettings, native_profile: str, backend: Backend, model: onnx.ModelProto, info: ModelInfo
) -> LatencyPredictor | None:
    """The predictor a study's trials take their latency from; None: they are timed (paired) here.

    ``native_profile``: the quantization profile of the backend the study runs on,
    before ``--profile`` replaced it. A table when ``--latency-table`` is given; the
    MAC estimate when the profile is another backend's; else None.
    """
    if settings.backend.latency_table is not None:
        table = load_table(settings.backend.latency_table, model, info, backend.profile.name)
        timing_threads = getattr(backend, "timing_threads", None)
        if (getattr(table, "threads", None) is not None and getattr(table, "backend", None) == backend.name
                and timing_threads is not None and timing_threads != table.threads):
            log.warning(
                "--latency-table %s: profiled at %d threads per session, this study times at %d; a kernel's INT8 gain "
                "changes with the thread count, so its predictions may be off: pass --threads %d, or measure the table "
                "again with --threads %d", settings.backend.latency_table, table.threads, timing_threads, table.threads,
                timing_threads,
            )
        return table
    if settings.search.profile is not None and settings.search.profile != native_profile:
        return MacEstimate.for_model(model, info)
    return None


def runs_on_target(predictor: LatencyPredictor | None, backend: Backend) -> bool:
    """Is ``backend`` the machine the predictor speaks for, so timing here is timing on the target?

    True without a predictor (the study timed its trials here); for a table made with
    this backend and profile (the CPU flow); never for the estimate.
    """
    if predictor is None:
        return True
    if predictor.source != SOURCE_TABLE:
        return False
    return getattr(predictor, "backend", None) == backend.name and getattr(predictor, "profile", None) == backend.profile.name


def latency_source_identity(settings: StudySettings, predictor: LatencyPredictor | None) -> dict[str, Any]:
    """What the study's latency means, for its identity: a different table (or none) is a different experiment.

    Empty for paired timing, so studies made before predicted latency existed keep their identity.
    """
    if predictor is None:
        return {}
    part: dict[str, Any] = {"source": predictor.source}
    if predictor.source == SOURCE_TABLE and settings.backend.latency_table is not None:
        from sensisearch.fileio import sha256_file

        part["table_sha256"] = sha256_file(Path(settings.backend.latency_table))
    return part


# --------------------------------------------------------------------------- a trial's record
def predicted_latency_record(
    predictor: LatencyPredictor, precisions: Mapping[str, Precision | str], objective: str, batch: int
) -> dict[str, Any]:
    """The trial's ``latency`` from ``predictor``: no timing, no CI.

    ``median_ms`` (what the front minimises) is the table's milliseconds, or for the
    unitless estimate the configuration's cost over all-FP32's (:data:`COST_UNIT`);
    ``reference_ms`` is all-FP32 on the same scale, so ``median_ms = reference_ms / speedup``
    as for paired timing.
    """
    fp32 = {name: Precision.FP32 for name in precisions}
    reference = predictor.predict(fp32)
    value = predictor.predict(precisions)
    if predictor.unit != "ms":  # a relative cost: scaled so all-FP32 is 1
        value, reference = value / reference, 1.0
    return {
        "source": predictor.source,
        "label": predictor.label,
        "unit": "ms" if predictor.unit == "ms" else COST_UNIT,
        "median_ms": float(value),
        "reference_ms": float(reference),
        "speedup": float(predictor.speedup(precisions)),
        "objective": objective,
        "batch_size": batch,
    }


def store_predicted_reference(study: optuna.Study, record: Mapping[str, Any]) -> None:
    """The study's reference latency on the predicted scale (all-FP32's prediction), set once.

    What ``verify`` turns a verified speed-up into the study's ``median_ms`` scale with,
    so verified and predicted trials share one front.
    """
    from sensisearch.study.store._record import read_reference_ms, reference_ms_attrs

    if read_reference_ms(study.user_attrs) is None and record.get("reference_ms") is not None:
        for key, value in reference_ms_attrs(float(record["reference_ms"])).items():
            study.set_user_attr(key, value)


# --------------------------------------------------------------------------- words
def speed_label(r: TrialRecord) -> str:
    """What a trial's speed figure is, in words: ``verified on B``, ``paired``, or the predictor's label."""
    if r.is_verified:
        backend = None if r.verified is None else r.verified.backend
        return f"verified on {backend}" if backend else "verified"
    if r.is_predicted:
        return str(r.latency.get("label") or r.latency_source)
    return "in-study" if r.paired is not None else "unpaired"


def study_speed_label(recs: Sequence[TrialRecord]) -> str | None:
    """The predictor's label when the study's in-study speeds are predicted, else None."""
    labels = [str(r.latency.get("label") or r.latency_source) for r in recs if r.is_predicted]
    return labels[0] if labels else None


def predicted_unit(recs: Sequence[TrialRecord]) -> str:
    """The unit of the study's ``median_ms`` figures: "ms", or :data:`COST_UNIT` for the estimate."""
    return next((str(r.latency.get("unit", "ms")) for r in recs if r.is_predicted), "ms")


def partial_int8_verdict(recs: Sequence[TrialRecord]) -> str | None:
    """One sentence when partial-INT8 configurations (some layers INT8, some float) are slower than FP32.

    With timing (paired or verified): those whose speed-up CI upper bound is below 1.
    With predicted latency only: those predicted below 1, and the sentence says it is a
    prediction. None when no partial-INT8 configuration is (significantly) slower.
    """
    partial = [
        r for r in recs
        if r.state == "COMPLETE" and r.baseline is None and r.requested_counts()["int8"]
        and r.requested_counts()["int8"] < sum(r.requested_counts().values())
    ]
    timed = [r for r in partial if r.speedup_ci95 is not None]
    if timed:
        slower = [r for r in timed if r.speedup_ci95[1] < 1.0]  # type: ignore[index]
        total, how = len(timed), "significantly slower than FP32 (speed-up 95% CI entirely below 1)"
        kind = "measured"
    else:
        timed = [r for r in partial if r.is_predicted and r.speedup is not None]
        slower = [r for r in timed if r.speedup < 1.0]  # type: ignore[operator]
        total, how = len(timed), f"predicted slower than FP32 ({study_speed_label(timed) or 'predicted'}; not measured)"
        kind = "predicted"
    if not slower:
        return None
    if kind == "predicted" and all(r.latency_source == SOURCE_ESTIMATE for r in slower):
        # The estimate is a relative cost, never a speed: the sentence gives costs.
        costs = sorted(1.0 / float(r.speedup) for r in slower)  # type: ignore[arg-type]
        return (
            f"**Partial INT8 is estimated to cost more than FP32 here**: {len(slower)} of {total} partial-INT8 "
            f"configurations (some layers INT8, some float) have an estimated relative cost above FP32's 1, typically "
            f"{statistics.median(costs):.2f} (range {costs[0]:.2f}-{costs[-1]:.2f}; {study_speed_label(slower)}; not "
            "measured), so the front is an accuracy-only listing, not a speed/accuracy trade-off."
        )
    ratios = sorted(float(r.speedup) for r in slower)  # type: ignore[arg-type]
    return (
        f"**Partial INT8 is slower here**: {len(slower)} of {total} partial-INT8 configurations (some layers INT8, some "
        f"float) are {how}, typically {statistics.median(ratios):.2f}x the speed of FP32 ({kind} range "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x): the boundaries between INT8 and float cost more than the INT8 layers save, "
        "so the front is an accuracy-only listing, not a speed/accuracy trade-off."
    )


# --------------------------------------------------------------------------- stage 2: predicted vs measured
def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho of two paired samples (average ranks for ties); None below 3 pairs or without spread."""
    from sensisearch.measure import spearman_rho

    return spearman_rho(a, b)


def compare_predicted(recs: Sequence[TrialRecord], backend: str) -> PredictionCheck | None:
    """In-study vs verified speed-up of every verified trial but FP32; None when nothing was verified."""
    rows = []
    for r in recs:
        if not r.is_verified or r.baseline == "fp32":
            continue
        in_study, verified = r.in_study_speedup, None if r.verified is None else r.verified.speedup
        if in_study is not None and verified is not None:
            rows.append((r.number, float(in_study), float(verified)))
    if not rows:
        return None
    source = next((r.latency_source for r in recs if r.is_verified and r.baseline != "fp32"), SOURCE_PAIRED)
    rho = rank_correlation([a for _, a, _ in rows], [b for _, _, b in rows])
    return PredictionCheck(backend, source, rho, tuple(rows))


def prediction_lines(check: PredictionCheck | None) -> list[str]:
    """report.md's section on predicted vs measured speed-up (empty without a check)."""
    if check is None:
        return []
    lines = ["", "## Predicted vs measured speed-up", "", check.summary() + ".", "",
             "| trial | in-study speed-up | verified speed-up | verified / in-study |", "|---:|---:|---:|---:|"]
    if check.source == SOURCE_ESTIMATE:
        # The in-study figure was the estimate: shown as the relative cost it is, beside the measured speed-up.
        lines[-2:] = ["| trial | in-study estimated cost (FP32 = 1) | verified speed-up |", "|---:|---:|---:|"]
        lines += [f"| {n} | {1.0 / a:.2f} | {b:.2f}x |" for n, a, b in check.rows]
        return lines
    lines += [f"| {n} | {a:.2f}x | {b:.2f}x | {b / a:.2f} |" for n, a, b in check.rows]
    return lines
