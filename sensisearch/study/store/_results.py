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
from sensisearch.study.store._classes import read_latency_classes
from sensisearch.study.store._record import TrialRecord

log = logging.getLogger(__name__)

# All-INT8 must beat FP32 by more than latency noise to count as a speed-up.
SPEEDUP_NOISE = 0.05


def records(study: optuna.Study) -> list[TrialRecord]:
    """Every trial's record, with the verify tournament's figures where it ran, and its latency class's
    pooled in-study figure in place of its own timing (members of one placement share one speed)."""
    attrs = study.user_attrs
    classes = read_latency_classes(attrs)
    figures = {key: cls.figure() for key, cls in classes.items() if cls.ratios}
    out = []
    for t in study.get_trials(deepcopy=False):
        r = TrialRecord.from_trial(t, attrs)
        if r.latency_class in figures:
            r = r.with_class_figure(figures[r.latency_class])  # type: ignore[index]
        out.append(r)
    return out


def ranked_pool(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Complete feasible trials with a value and a latency that may be ranked together.

    Once the verify tournament ran, only verified figures are ranked: a verified
    figure and an in-study one were taken at different moments with different
    precision, so comparing them ranks noise (an unverified 2.79x once sat beside
    the verified 2.41x of the same placement). Unverified trials are then listed
    apart (:func:`unverified_apart`)."""
    done = [r for r in recs if r.state == "COMPLETE" and r.feasible and r.value is not None and r.median_ms is not None]
    if any(r.is_verified for r in done):
        done = [r for r in done if r.is_verified]
    return done


def unverified_apart(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Complete feasible trials left out of the ranking because the tournament did not verify them (empty before it ran)."""
    done = [r for r in recs if r.state == "COMPLETE" and r.feasible and r.value is not None and r.median_ms is not None]
    if not any(r.is_verified for r in done):
        return []
    return sorted((r for r in done if not r.is_verified), key=lambda r: r.number)


def pareto_front(recs: list[TrialRecord]) -> list[TrialRecord]:
    """Non-dominated feasible complete trials (max value, min latency), sorted by latency.

    Computed here rather than with ``study.best_trials`` so the same rule
    applies to records read back from any storage. Verified figures only once
    verification ran (:func:`ranked_pool`); of the members of one latency class
    (one figure per placement) only the most accurate belongs, the lowest trial
    number on a tie.
    """
    done = ranked_pool(recs)
    front = []
    for r in done:
        dominated = any(
            o.value >= r.value and o.median_ms <= r.median_ms and (o.value > r.value or o.median_ms < r.median_ms)  # type: ignore[operator]
            for o in done
        )
        same_class_better = r.latency_class is not None and any(
            o.latency_class == r.latency_class and o.number != r.number
            and (o.value, -o.number) > (r.value, -r.number)  # type: ignore[operator]
            for o in done
        )
        if not dominated and not same_class_better:
            front.append(r)
    return sorted(front, key=lambda r: (r.median_ms, -(r.value or 0.0)))


def baseline(recs: list[TrialRecord], name: str) -> TrialRecord | None:
    return next((r for r in recs if r.baseline == name and r.state == "COMPLETE"), None)


@dataclass
class WinnerChoice:
    record: TrialRecord | None
    qualified: bool
    reason: str
    passed_over: tuple[int, ...] = ()
    """Trials within ``max_drop`` on the search images that clearly failed on the held-out ones (``--holdout``)."""


NOT_SIGNIFICANT = "no configuration is significantly faster than FP32 on this backend for this model"


def is_estimate(r: TrialRecord) -> bool:
    """Is the trial's speed figure the MAC estimate (a relative cost: nothing was measured)?"""
    return r.latency_source == "estimate" and not r.is_verified


def relative_cost_text(speedup: float, note: str = "") -> str:
    """``cost 0.62 (FP32 = 1)``: the estimate on its own scale, never "N x faster"."""
    return f"cost {1.0 / speedup:.2f} (FP32 = 1{', ' + note if note else ''})"


def speed_text(r: TrialRecord) -> str:
    """``1.96x (95% CI 1.90-2.02, verified)``: a trial's paired speed-up vs FP32 with its evidence."""
    if r.speedup is not None and r.speedup_ci95 is None and is_estimate(r):
        # Nothing was measured: a relative cost on the FP32 = 1 scale, never "N x faster".
        return relative_cost_text(r.speedup, str(r.latency.get("label") or "estimate"))
    if r.speedup is not None and r.speedup_ci95 is None and r.is_predicted:
        # A predicted figure has no CI; it says what it is instead.
        return f"{r.speedup:.2f}x ({r.latency.get('label') or r.latency_source}, no CI)"
    if r.speedup is None or r.speedup_ci95 is None:
        return "no paired speed-up"
    lo, hi = r.speedup_ci95
    return f"{r.speedup:.2f}x (95% CI {lo:.2f}-{hi:.2f}, {'verified' if r.is_verified else 'in-study'})"


def _significant(r: TrialRecord, min_speedup: float) -> bool:
    ci = r.speedup_ci95
    return ci is not None and ci[0] > min_speedup


def choose_winner(recs: list[TrialRecord], max_drop: float, min_speedup: float = 1.0) -> WinnerChoice:
    """The fastest feasible trial within ``max_drop`` points of FP32 that is *significantly* faster than FP32.

    Significantly: the lower bound of its paired speed-up's 95% CI exceeds
    ``min_speedup`` (verified figures when the verify tournament ran; then only
    verified trials can win). A configuration no faster than FP32 is no winner,
    however accurate: FP32 itself is the better choice. Studies recorded before
    paired timing (no CI anywhere) fall back to "median below FP32's". When
    nothing qualifies, the most accurate non-baseline trial is exported as
    best-effort, and the reason says why, with the numbers.
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
    near = [r for r in candidates if fp32.value - r.value <= max_drop + 1e-9]  # type: ignore[operator]
    # --holdout: a trial scored on the held-out images must not clearly fail there (HoldoutScore.fails).
    held_out = sorted((r for r in near if r.fails_holdout(max_drop)), key=lambda r: r.number)
    passed_over = tuple(r.number for r in held_out)
    within = [r for r in near if not r.fails_holdout(max_drop)]
    paired = any(r.speedup_ci95 is not None for r in recs)
    verified = any(r.is_verified for r in candidates)
    if paired:
        pool = [r for r in within if r.is_verified] if verified else within
        qualifying = [r for r in pool if _significant(r, min_speedup)]
        rule = f"whose {'verified' if verified else 'in-study'} speed-up CI lower bound exceeds {min_speedup:g}"
    elif any(r.is_predicted for r in candidates):
        # Latency predicted (table or estimate), not measured: the winner is chosen on the
        # predicted speed-up, and the reason says it is unverified until stage 2 runs on the target.
        qualifying = [r for r in within if r.is_predicted and (r.speedup or 0.0) > min_speedup]
        what = (f"whose estimated relative cost is below {1.0 / min_speedup:.2f} of FP32's"
                if any(is_estimate(r) for r in within) else f"whose predicted speed-up exceeds {min_speedup:g}")
        rule = (
            f"{what} (predicted, not measured: unverified until "
            "`sensisearch verify RUN_DIR --backend <target>` runs on the target)"
        )
    else:
        qualifying = [r for r in within if r.median_ms < fp32.median_ms]  # type: ignore[operator]
        rule = "faster than FP32 (unpaired timing: recorded before speed-up CIs)"
    if qualifying:
        best = min(qualifying, key=lambda r: (r.median_ms, -r.value))  # type: ignore[arg-type, return-value]
        return WinnerChoice(best, True, f"fastest trial within {max_drop:g} points of FP32 {rule}: {speed_text(best)}"
                            + _holdout_text(best, held_out), passed_over)
    pool = [r for r in candidates if r.baseline is None] or candidates
    best = max(pool, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    if within and paired:
        int8 = baseline(recs, "int8")
        fastest = max(within, key=lambda r: (r.speedup_ci95 or (0.0, 0.0))[0])
        numbers = [f"all-INT8 {speed_text(int8)}" if int8 is not None else "all-INT8 did not complete"]
        numbers.append(
            f"the best candidate within {max_drop:g} points, trial {fastest.number}: {speed_text(fastest)}, "
            f"drop {fp32.value - fastest.value:.2f}"  # type: ignore[operator]
        )
        reason = (
            f"{NOT_SIGNIFICANT} (speed-up CI lower bound above {min_speedup:g} required; {'; '.join(numbers)}); "
            "best-effort export of the most accurate non-baseline trial (FP32 itself is the better choice here)"
        )
    elif within:
        reason = (
            f"no trial within {max_drop:g} points of FP32 is faster than FP32 on this backend; "
            "best-effort export of the most accurate non-baseline trial (FP32 itself is the better choice here)"
        )
    else:
        reason = f"no trial stays within {max_drop:g} points of FP32; best-effort export of the most accurate non-baseline trial"
    return WinnerChoice(best, False, reason + _holdout_text(None, held_out), passed_over)


def _holdout_text(best: TrialRecord | None, passed_over: list[TrialRecord]) -> str:
    """What the held-out images said of the winner and of the trials they ruled out, in trial order ("" without --holdout)."""
    parts = []
    if best is not None and best.holdout is not None:
        ci = best.holdout.drop_ci95
        parts.append(f"held-out drop {best.holdout.drop:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")
                     + f" on {best.holdout.images} images")
    if passed_over:
        worst = ", ".join(f"{r.number} ({r.holdout.drop:.2f})" for r in passed_over)  # type: ignore[union-attr]
        parts.append(f"passed over for their held-out drop: trial {worst}")
    return "".join(f"; {p}" for p in parts)


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
        "config": {} if record.config is None else record.config.to_dict(),
        "metric": record.metric,
        "value": record.value,
        "fp32_value": None if fp32 is None else fp32.value,
        "max_drop": max_drop,
        "latency": record.latency,
        "median_ms": record.median_ms,
        "speedup": record.speedup,
        "speedup_ci95": None if record.speedup_ci95 is None else list(record.speedup_ci95),
        "verified": record.is_verified,
        # "verified", "paired", or "table"/"estimate" (predicted: unverified on the target; label says how).
        "speedup_source": record.speedup_source,
        "speedup_label": record.latency.get("label") if record.is_predicted and not record.is_verified else None,
        "drop_ci95": None if record.drop_ci is None else list(record.drop_ci),
        # --holdout: the same on the evaluation images the search never saw (None: the study held none out).
        "holdout": None if record.holdout is None else record.holdout.to_dict(),
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
        # Absolute, so pareto.json means the same from any directory.
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
        "speedup", "speedup_ci_lo", "speedup_ci_hi", "verified", "in_study_ms", "drop_ci_lo", "drop_ci_hi",
    ])
    for r in front:
        req = r.requested_counts()
        cal = None if r.config is None else r.config.calibration
        writer.writerow([
            r.number, r.baseline or "", r.metric, f"{r.value:.4f}",
            "" if reference is None else f"{reference - r.value:.4f}",  # type: ignore[operator]
            f"{r.median_ms if r.median_ms is not None else float('nan'):.4f}", f"{r.latency.get('p90_ms', float('nan')):.4f}",
            r.latency.get("runs", ""), req["int8"], req["fp16"], req["fp32"], r.layer_precisions.get("int8", ""),
            cal.algorithm.value if req["int8"] and cal else "", cal.samples if req["int8"] and cal else "",
            cal.percentile if req["int8"] and cal and cal.algorithm.value == "percentile" else "",
            str(trial_file(r.artifact, out, r.number) or ""),
            "" if r.speedup is None else f"{r.speedup:.4f}",
            "" if r.speedup_ci95 is None else f"{r.speedup_ci95[0]:.4f}", "" if r.speedup_ci95 is None else f"{r.speedup_ci95[1]:.4f}",
            int(r.is_verified), "" if r.in_study_ms is None else f"{r.in_study_ms:.4f}",
            "" if r.drop_ci is None else f"{r.drop_ci[0]:.4f}", "" if r.drop_ci is None else f"{r.drop_ci[1]:.4f}",
        ])
    write_text_atomic(out / "pareto.csv", buffer.getvalue())
