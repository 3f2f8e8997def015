"""Study results: Pareto front, winner export, report files.

Everything here reads the Optuna storage only, so results can be rewritten at
any time (after a crash, or by another worker): re-running ``sensisearch run``
with the same budget rewrites them without running a trial.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from sensisearch.fileio import write_json_atomic, write_text_atomic
from sensisearch.study._record import TrialRecord

log = logging.getLogger(__name__)

# All-INT8 must beat FP32 by more than latency noise to count as a speed-up.
SPEEDUP_NOISE = 0.05


def records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False)]


def pareto_front(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Non-dominated feasible complete trials (max value, min latency), sorted by latency.

    Computed here rather than with ``study.best_trials`` so the same rule
    applies to records read back from any storage.
    """
    done = [r for r in recs if r.state == "COMPLETE" and r.feasible and r.value is not None and r.median_ms is not None]
    front = []
    for r in done:
        dominated = any(
            o.value >= r.value and o.median_ms <= r.median_ms and (o.value > r.value or o.median_ms < r.median_ms)  # type: ignore[operator]
            for o in done
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r.median_ms, -(r.value or 0.0)))


def baseline(recs: list[TrialRecord], name: str) -> TrialRecord | None:
    return next((r for r in recs if r.baseline == name and r.state == "COMPLETE"), None)


@dataclass
class WinnerChoice:
    record: TrialRecord | None
    qualified: bool
    reason: str


def choose_winner(recs: list[TrialRecord], max_drop: float) -> WinnerChoice:
    """The fastest feasible trial within ``max_drop`` points of FP32 that is also faster than FP32.

    A configuration slower than the FP32 baseline is no winner, however accurate:
    FP32 itself dominates it. When nothing qualifies, the most accurate
    non-baseline trial is exported as best-effort, and the reason says why.
    """
    fp32 = baseline(recs, "fp32")
    candidates = [
        r for r in recs
        if r.state == "COMPLETE" and r.feasible and r.baseline != "fp32" and r.value is not None and r.median_ms is not None
    ]
    if not candidates:
        return WinnerChoice(None, False, "no trial other than the FP32 baseline completed")
    if fp32 is None or fp32.value is None or fp32.median_ms is None:
        best = max(candidates, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
        return WinnerChoice(best, False, "the FP32 baseline did not complete, so no accuracy drop can be judged; best-effort: the most accurate trial")
    within = [r for r in candidates if fp32.value - r.value <= max_drop + 1e-9]  # type: ignore[operator]
    qualifying = [r for r in within if r.median_ms < fp32.median_ms]  # type: ignore[operator]
    if qualifying:
        best = min(qualifying, key=lambda r: (r.median_ms, -r.value))  # type: ignore[arg-type, return-value]
        return WinnerChoice(best, True, f"fastest trial within {max_drop:g} points of FP32")
    pool = [r for r in candidates if r.baseline is None] or candidates
    best = max(pool, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    if within:
        reason = (
            f"no trial within {max_drop:g} points of FP32 is faster than FP32 on this backend; "
            "best-effort export of the most accurate non-baseline trial (FP32 itself is the better choice here)"
        )
    else:
        reason = f"no trial stays within {max_drop:g} points of FP32; best-effort export of the most accurate non-baseline trial"
    return WinnerChoice(best, False, reason)


def export_winner(
    choice: WinnerChoice, recs: list[TrialRecord], out: Path, model_path: Path, model_sha256: str,
    backend: dict[str, Any], max_drop: float, thresholds: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    if choice.record is None:
        return None
    record = choice.record
    winner_dir = out / "winner"
    tmp_dir = out / "winner.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    files = {}
    for key, recorded in (("artifact", record.artifact), ("deployable_onnx", record.deployable)):
        src = trial_file(recorded, out, record.number)
        if src and src.is_file():
            shutil.copy2(src, tmp_dir / Path(src).name)
            files[key] = Path(src).name
    fp32 = baseline(recs, "fp32")
    config = {
        "status": "qualified" if choice.qualified else "best-effort",
        "reason": choice.reason,
        "trial": record.number,
        "model": {"path": str(model_path.resolve()), "sha256": model_sha256},
        "backend": backend,
        "config": record.config,
        "metric": record.metric,
        "value": record.value,
        "fp32_value": None if fp32 is None else fp32.value,
        "max_drop": max_drop,
        "latency": record.latency,
        "layers_run": record.layer_precisions,
        "files": files,
        # Calibrated ranges of every tensor any backend may quantize: `sensisearch
        # build --config` rebuilds this configuration from this file alone.
        "thresholds": thresholds or {},
        **(extra or {}),
    }
    write_json_atomic(tmp_dir / "config.json", config)
    # Replace the previous winner in one step, so a crash leaves one complete folder.
    old = out / "winner.old"
    shutil.rmtree(old, ignore_errors=True)
    if winner_dir.exists():
        os.replace(winner_dir, old)
    os.replace(tmp_dir, winner_dir)
    shutil.rmtree(old, ignore_errors=True)
    return winner_dir


def trial_file(recorded: str | None, out: Path, number: int) -> Path | None:
    """A file a trial recorded, as an absolute path.

    Trials store paths as the run gave them, relative to the directory it was
    started from; a later ``sensisearch report`` may run elsewhere, so a relative
    path that does not exist from here is looked up in the trial's own folder.
    """
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (out / "trials" / f"{number:04d}" / path.name).resolve()


def write_pareto(front: list[TrialRecord], reference: float | None, out: Path) -> None:
    entries = []
    for r in front:
        entry = r.to_dict(reference)
        # Absolute, so pareto.json means the same from any directory (issue 11).
        for key in ("artifact", "deployable_onnx"):
            entry[key] = None if entry[key] is None else str(trial_file(entry[key], out, r.number))
        entries.append(entry)
    write_json_atomic(out / "pareto.json", entries)
    # Built in memory, then written atomically like every other result file.
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([
        "trial", "baseline", "metric", "value", "drop", "median_ms", "p90_ms", "runs",
        "int8_layers", "fp16_layers", "fp32_layers", "int8_kernels", "algorithm", "samples", "percentile", "artifact",
    ])
    for r in front:
        req = r.requested_counts()
        cal = r.config.get("calibration", {})
        writer.writerow([
            r.number, r.baseline or "", r.metric, f"{r.value:.4f}",
            "" if reference is None else f"{reference - r.value:.4f}",  # type: ignore[operator]
            f"{r.latency.get('median_ms', float('nan')):.4f}", f"{r.latency.get('p90_ms', float('nan')):.4f}",
            r.latency.get("runs", ""), req["int8"], req["fp16"], req["fp32"], r.layer_precisions.get("int8", ""),
            cal.get("algorithm", "") if req["int8"] else "", cal.get("samples", "") if req["int8"] else "",
            cal.get("percentile", "") if req["int8"] and cal.get("algorithm") == "percentile" else "",
            str(trial_file(r.artifact, out, r.number) or ""),
        ])
    write_text_atomic(out / "pareto.csv", buffer.getvalue())
