"""Many workers on one study: stored settings, where each trial ran, and bounded disk.

- :func:`store_settings` records the resolved settings in the study when it is
  made; :func:`stored_settings` reads them back, so ``sensisearch worker`` on
  another host needs only the storage URL, the study name and (where they differ)
  the data paths.
- :func:`worker_host` / :func:`worker_device` say where a trial ran (recorded in
  every :class:`~sensisearch.study.store._record.TrialRecord`).
- :func:`trials_to_keep` / :func:`prune_artifacts` keep the large files of the
  front, the baselines, the winner and the top-k trials, and delete the others'
  (``trial.json`` stays); :func:`disk_usage` is what the report shows.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sensisearch.errors import SensisearchError
from sensisearch.study.store._record import TrialRecord
from sensisearch.study.store._storage import mask_url, open_storage
from sensisearch.study.store._results import choose_winner, pareto_front, records
from sensisearch.study.config._settings import StudySettings, flat_settings, merge_settings, setting_names

if TYPE_CHECKING:
    import optuna


log = logging.getLogger(__name__)

# Study user attribute holding StudySettings.to_dict() (paths absolute, storage URL masked); earlier
# releases stored the same values flat, which StudySettings.from_dict still reads.
SETTINGS_ATTR = "settings"
VERIFIED_FILE = "verified.json"
"""A verified trial's tournament figures, beside its ``trial.json``: that one is written once, when the trial
ends, and never again, so a re-run or a re-verification can never alter what the trial measured."""
# Files of a pruned trial that stay: its record, its verified figures and why it failed, if it did.
KEPT_FILES = ("trial.json", VERIFIED_FILE, "stderr.log")
NVIDIA_SMI_TIMEOUT_SECONDS = 10


# ---------------------------------------------------------------- settings in the study
def settings_to_store(settings: StudySettings, out: Path) -> dict[str, Any]:
    """``settings`` as a study attribute: paths absolute (another worker resolves them as given), URL masked."""
    # A server URL is kept masked (it names the server for humans); the default SQLite file is not kept:
    # `report` and `worker` are told where the study is.
    storage = settings.storage.storage
    stored = settings.with_absolute_paths().replace(out=out.resolve(), storage=mask_url(storage) if storage else None)
    return stored.to_dict()


def store_settings(study: optuna.Study, settings: StudySettings, out: Path) -> None:
    study.set_user_attr(SETTINGS_ATTR, settings_to_store(settings, out))


def stored_settings(storage_url: str, study_name: str, overrides: dict[str, Any], heartbeat_seconds: int = 30) -> StudySettings:
    """The settings ``study_name`` was made with, ``overrides`` (flags given, not None) applied.

    Opens the storage first: a wrong URL or password is one line before any other work.
    """
    storage = open_storage(storage_url, heartbeat_seconds)
    masked = mask_url(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise SensisearchError(
            f"--study-name {study_name}: no such study in {masked} (it has: {', '.join(names) or 'none'}); "
            "start it with sensisearch run ... --storage URL --study-name NAME"
        ) from None
    values = storage.get_study_user_attrs(study_id).get(SETTINGS_ATTR)
    storage.remove_session()
    if values is None:
        raise SensisearchError(
            f"--study-name {study_name} in {masked}: the study has no stored settings (made by an older version); "
            "run sensisearch run with the study's flags instead"
        )
    # Nested (StudySettings.to_dict) or flat (earlier releases); a setting this version does not know is left out.
    known = setting_names()
    values = {k: v for k, v in flat_settings(values).items() if k in known}
    values["storage"] = storage_url  # the stored one is masked
    values["study_name"] = study_name
    values["example"] = values.get("example") if overrides.get("model") is None else None
    return merge_settings(values, overrides, None)


def study_names(storage_url: str) -> list[str]:
    storage = open_storage(storage_url, 30)
    names = sorted(s.study_name for s in storage.get_all_studies())
    storage.remove_session()
    return names


# ---------------------------------------------------------------- where a trial ran
def worker_host() -> str:
    return socket.gethostname()


def _visible_gpu() -> str | None:
    """``-i`` for nvidia-smi: the first entry of CUDA_VISIBLE_DEVICES (an index or a UUID)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return first or None


def nvidia_gpu() -> str | None:
    """``"NAME (GPU-UUID)"`` of the GPU this worker uses, from nvidia-smi; None without one."""
    index = _visible_gpu()
    if index is None or shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,uuid", "--format=csv,noheader", "-i", index],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    name, _, uuid = line.partition(",")
    return f"{name.strip()} ({uuid.strip()})" if name.strip() else None


def worker_device(backend_name: str) -> str:
    """The GPU (name and UUID) for a GPU backend, else the CPU model."""
    if backend_name.startswith("tensorrt"):
        gpu = nvidia_gpu()
        if gpu is not None:
            return gpu
    from sensisearch.measure import machine_identity

    return f"CPU {machine_identity().cpu_model}"


# ---------------------------------------------------------------- disk
def trials_to_keep(recs: list[TrialRecord], keep: int | None, max_drop: float) -> set[int] | None:
    """Trial numbers whose artifacts stay: front, baselines, winner, top-``keep`` by metric; None: all.

    Only finished trials can be pruned; RUNNING ones (this or another worker's) are always kept.
    """
    if keep is None:
        return None
    kept = {r.number for r in recs if r.state not in ("COMPLETE", "FAIL", "PRUNED")}
    kept |= {r.number for r in recs if r.baseline is not None}
    kept |= {r.number for r in pareto_front(recs)}
    winner = choose_winner(recs, max_drop).record
    if winner is not None:
        kept.add(winner.number)
    complete = [r for r in recs if r.state == "COMPLETE" and r.value is not None]
    kept |= {r.number for r in sorted(complete, key=lambda r: (-(r.value or 0.0), r.number))[:keep]}
    return kept


def prune_artifacts(trials_dir: Path, recs: list[TrialRecord], keep: int | None, max_drop: float) -> int:
    """Delete every file but ``trial.json``/``stderr.log`` in the folders of trials not kept; returns bytes freed."""
    kept = trials_to_keep(recs, keep, max_drop)
    if kept is None or not trials_dir.is_dir():
        return 0
    prunable = {r.number for r in recs} - kept
    freed = 0
    for number in sorted(prunable):
        folder = trials_dir / f"{number:04d}"
        if not folder.is_dir():
            continue  # the trial ran on another host, or was pruned already
        for path in folder.iterdir():
            if path.name in KEPT_FILES:
                continue
            size = _size(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            freed += size
    if freed:
        log.info("pruned %.1f MiB of artifacts (--keep-artifacts %s)", freed / 2**20, keep)
    return freed


def artifact_pruner(
    trials_dir: Path, keep: int | None, max_drop: float
) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """An Optuna callback: prune after every finished trial."""

    def prune(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        prune_artifacts(trials_dir, records(study), keep, max_drop)

    return prune


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def disk_usage(paths: Iterable[Path]) -> int:
    """Bytes of every file under ``paths`` (symlinks counted as links)."""
    return sum(_size(p) for p in paths if p.exists())


def append_disk_section(report: Path, out: Path, keep: int | None) -> int:
    """Add how much disk the study's folder uses to ``report.md``; returns the bytes."""
    used = disk_usage([out])
    trials = out / "trials"
    with_artifacts = sum(
        1 for d in (trials.iterdir() if trials.is_dir() else ()) if any(p.name not in KEPT_FILES for p in d.iterdir())
    )
    policy = "all artifacts are kept" if keep is None else (
        f"artifacts kept for the front, baselines, winner and top {keep} (--keep-artifacts); other trials keep trial.json"
    )
    text = report.read_text() if report.is_file() else ""
    section = (
        f"\n## Disk\n\n{out} uses {used / 2**20:.1f} MiB on this host; {with_artifacts} trial folders hold artifacts; {policy}.\n"
    )
    from sensisearch.fileio import write_text_atomic

    write_text_atomic(report, text.rstrip("\n") + "\n" + section)
    return used
