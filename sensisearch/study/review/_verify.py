"""The verified front: re-time FP32, all-INT8, the front and its noise band in one tournament.

In-study speed-ups are each paired with FP32 and drift-free, but every trial got
a few seconds of timing at a different moment. After the last trial (and with
``sensisearch verify RUN_DIR``) the trials that decide the result are timed
again together, interleaved in shuffled rounds with FP32 as the reference arm,
with more rounds; drop CIs are recomputed with more resamples. The figures are
stored in the study (:func:`sensisearch.study.store._record.verified_attrs`) and the
front, winner and report use them, marked "verified", beside the in-study ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.fileio import write_json_atomic
from sensisearch.progress import doing, format_seconds, note_step
from sensisearch.measure import (
    CONTROL_ARM,
    LoadPolicy,
    PairedBootstrap,
    PairedLatency,
    PairedTimingSettings,
    QuietVerdict,
    control_result,
    corrected,
    time_interleaved,
    wait_for_quiet,
)
from sensisearch.study.trial import _accuracy
from sensisearch.study.store._record import (
    TrialRecord,
    read_fp32_per_image,
    read_reference_ms,
    read_verified,
    verified_attrs,
    VERIFY_SUMMARY_ATTR,
)
from sensisearch.study.store._timing import PairedTiming, Verification
from sensisearch.study.trial._pipeline import runs_per_round
from sensisearch.study.store._results import baseline, pareto_front, records
from sensisearch.study.store._worker import VERIFIED_FILE
from sensisearch.study.config._settings import StudySettings, flat_settings, merge_settings, setting_names

if TYPE_CHECKING:
    import optuna

    from sensisearch.backends.base import Backend, Runner
    from sensisearch.study.run._context import StudyContext

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
MAX_NOISE_BAND = 12
"""At most this many off-front trials join the tournament (closest to the front first): every
extra arm takes a share of the rounds."""

DROP_RESAMPLE_FACTOR = 2.5
"""Verify recomputes drop CIs with this many times the in-study resamples (detectors: ~13 ms per
COCO re-accumulation on 170 images, so 500 resamples x 2 models is ~13 s per verified trial)."""


@dataclass(frozen=True)
class VerifySettings:
    seconds: float = 30.0
    """Cap on the tournament's timed rounds."""
    rounds: int | None = None
    """Exactly this many rounds (overrides the CI target; ``seconds`` still caps)."""
    target_ci_width: float = 0.02
    drop_resamples: int = 500
    seed: int = 0

    @classmethod
    def for_study(cls, settings: StudySettings, seconds: float | None = None, rounds: int | None = None) -> VerifySettings:
        """The tournament for a study: its ``--verify-seconds``, a CI target at most 2%, and
        :data:`DROP_RESAMPLE_FACTOR` times the in-study bootstrap resamples."""
        return cls(
            seconds=seconds or settings.measurement.verify_seconds, rounds=rounds, target_ci_width=min(0.02, settings.measurement.timing_target_ci),
            drop_resamples=int(DROP_RESAMPLE_FACTOR * settings.measurement.drop_resamples), seed=settings.search.seed,
        )

    def timing(self) -> PairedTimingSettings:
        if self.rounds is not None:
            return PairedTimingSettings(
                min_rounds=self.rounds, max_rounds=self.rounds, max_seconds=self.seconds,
                target_ci_width=self.target_ci_width, n_resamples=2000, seed=self.seed,
            )
        return PairedTimingSettings(
            warmup_runs=10, min_rounds=40, max_rounds=20000, max_seconds=self.seconds,
            target_ci_width=self.target_ci_width, check_every=20, n_resamples=2000, seed=self.seed,
        )


@dataclass(frozen=True)
class VerifyResult:
    trials: tuple[int, ...]
    reference_trial: int
    seconds: float
    rounds: int
    """Timed rounds of the first tournament round."""
    tournaments: int = 1
    """Tournament rounds run until the fixed point (or the cap)."""
    unverified: tuple[int, ...] = ()
    """Trials the result still depends on that are not verified (the cap was hit)."""
    under_load: bool = False
    control: dict[str, Any] | None = None
    unsettled: tuple[int, ...] = ()
    """Verified trials whose figure was still not settled (:data:`SETTLED_CI_WIDTH`) after the last round."""


def _in_study(r: TrialRecord) -> TrialRecord:
    return dataclasses.replace(r, verified=None, verified_drop_ci95=None)


def _overlaps(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def select_for_verification(
    recs: list[TrialRecord], max_band: int = MAX_NOISE_BAND, usable_file: str = "artifact", nominated: Collection[int] = (),
) -> list[TrialRecord]:
    """FP32, all-INT8, the in-study front, the trials within its noise band and the feasible ``nominated`` ones, FP32 first.

    Chosen on in-study figures, so verifying twice selects the same trials. The
    noise band: complete feasible trials off the front whose in-study speed-up CI
    overlaps a front member's, i.e. that noise alone may have kept off the front.
    ``nominated``: trials a direct comparison called faster than their own timing may
    say (the guided search's speed walk, :func:`~sensisearch.study.search._guided.speed_trials`).
    """
    plain = [_in_study(r) for r in recs]
    # usable_file: "artifact" (timed as the study built it) or "deployable" (stage 2 builds it on another backend).
    usable = _usable(plain, usable_file)
    fp32 = baseline(usable, "fp32")
    if fp32 is None:
        return []
    chosen: dict[int, TrialRecord] = {fp32.number: fp32}
    int8 = baseline(usable, "int8")
    if int8 is not None:
        chosen[int8.number] = int8
    front = [r for r in pareto_front(usable) if r.artifact]
    for r in front:
        chosen.setdefault(r.number, r)
    band = [
        r for r in usable
        if r.number not in chosen and r.feasible and r.value is not None
        and any(_overlaps(r.paired_ci, m.paired_ci) for m in front)
    ]
    # Closest to the front first: the smallest gap in speed-up to any front member.
    band.sort(key=lambda r: min(abs((r.paired_speedup or 0.0) - (m.paired_speedup or 0.0)) for m in front))
    for r in band[:max_band]:
        chosen[r.number] = r
    for r in usable:
        if r.number in nominated and r.feasible and r.value is not None:
            chosen.setdefault(r.number, r)
    return list(chosen.values())


MAX_VERIFY_ROUNDS = 3
"""Tournament rounds at most: each round re-times what the previous round's verified front left
unverified; past this the result says which trials it could not verify."""

SETTLED_CI_WIDTH = 0.05
"""A verified figure is settled when its 95% CI is narrower than this fraction of it and another timing taken
at another time (the trial's in-study figure, or another tournament round) agrees with it within this fraction.
Why: on a shared 2-core VM the machine has spells (seconds to a minute) in which INT8 kernels run 10-15% slower relative to FP32,
which neither /proc nor the A/A control shows (both arms are one precision there). A timing that falls wholly
inside such a spell has a narrow CI and is wrong (digits: 2.52x [2.49, 2.54] verified, 2.77x in-study, 2.80x
on three re-timings); one that straddles its edge has a wide CI (YOLOv5n: 1.50x [1.39, 1.59], quiet 1.58x).
An unsettled figure is timed again in the next round; the kept timing is the narrow one nearest the median of
all the figures."""


def settle(history: Sequence[Verification], in_study: float | None) -> tuple[Verification, bool]:
    """The timing to keep of a trial's verify timings (oldest first) and whether it is settled (see
    :data:`SETTLED_CI_WIDTH`); ``in_study`` is the trial's in-study paired speed-up, if any."""
    narrow = [v for v in history if v.timing.relative_ci_width <= SETTLED_CI_WIDTH]
    candidates = narrow or list(history)
    figures = [v.timing.speedup for v in history] + ([in_study] if in_study is not None else [])
    middle = float(np.median(figures))
    kept = min(candidates, key=lambda v: (abs(v.timing.speedup - middle), v.timing.relative_ci_width))
    others = [v.timing.speedup for v in history if v is not kept] + ([in_study] if in_study is not None else [])
    agrees = any(abs(f - kept.timing.speedup) <= SETTLED_CI_WIDTH * kept.timing.speedup for f in others)
    return kept, bool(narrow) and kept in narrow and agrees


def unsettled(histories: Mapping[int, Sequence[Verification]], in_study: Mapping[int, float | None]) -> list[int]:
    """Trials whose verify timings are not settled yet."""
    return sorted(n for n, history in histories.items() if history and not settle(history, in_study.get(n))[1])


def _in_study_figure(r: TrialRecord, fp32: TrialRecord) -> float | None:
    """A trial's in-study paired speed-up; the FP32 reference is 1.00 by definition in every tournament."""
    return 1.0 if r.number == fp32.number else r.paired_speedup


@dataclass(frozen=True)
class TournamentRound:
    """One round of the tournament: the classes it timed, its A/A control and the load it saw."""

    trials: tuple[int, ...]
    """Trials whose figures it set (every member of every class it timed)."""
    arms: tuple[int, ...]
    """One representative trial per latency class actually timed (FP32 first)."""
    rounds: int
    seconds: float
    control: dict[str, Any] | None
    under_load: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class VerifyRefused(SensisearchError):
    """The machine is busier than the tournament's sessions allow, and ``--force`` was not given."""


def verify_load_policy(ctx: StudyContext) -> LoadPolicy:
    """Verify waits longer for quiet than a trial does: its figures are the ones the result keeps."""
    from sensisearch.study.trial._measurement import needed_cores

    return LoadPolicy(needed_cores=needed_cores(ctx.backend_settings), max_wait_s=10.0, max_retries=5, retry_wait_s=2.0)


def check_quiet(policy: LoadPolicy, max_wait_s: float | None = None) -> QuietVerdict:
    """Is the machine quiet enough for the tournament? Waits at most ``max_wait_s`` (the policy's by default)."""
    return wait_for_quiet(policy.needed_cores, policy.max_wait_s if max_wait_s is None else max_wait_s, policy.busy_threshold,
                          policy.window_s)


def refusal_line(verdict: QuietVerdict, policy: LoadPolicy) -> str:
    sample = verdict.sample
    seen = "" if sample is None else (
        f"others keep {sample.others_busy_cores():.1f} of {len(sample.busy)} cores busy, load1 {sample.load1}, "
        f"runnable {sample.runnable}"
        + ("" if sample.steal is None else f", steal {100 * sample.steal:.0f}%")
    )
    return (f"verify: refused: the machine is busy ({seen}; {policy.needed_cores} free core(s) needed, waited "
            f"{verdict.waited_s:.0f} s); figures timed now would rank load, not models: retry when it is quiet, "
            "or pass --force to time anyway (figures marked as taken under load)")


def _usable(recs: list[TrialRecord], usable_file: str) -> list[TrialRecord]:
    return [r for r in recs if r.state == "COMPLETE" and _has_file(r, usable_file)]


def _has_file(r: TrialRecord, usable_file: str) -> bool:
    """Whether trial ``r``'s ``usable_file`` ("artifact" or "deployable") is on this host now."""
    path = getattr(r, usable_file)
    return bool(path) and Path(path).is_file()


def _class_of(r: TrialRecord) -> str:
    return r.latency_class or f"trial:{r.number}"


def still_unverified(recs: list[TrialRecord], max_drop: float, min_speedup: float) -> list[TrialRecord]:
    """Trials the verified result still depends on without a verified figure: either baseline, the
    winner, any front member, and every unverified trial whose in-study figure at its optimistic
    CI bound would not be dominated by the verified front (its verified rank could change the front)."""
    from sensisearch.study.store._results import choose_winner

    done = [r for r in recs if r.state == "COMPLETE" and r.value is not None]
    out: dict[int, TrialRecord] = {}
    for name in ("fp32", "int8"):
        b = baseline(done, name)
        if b is not None and not b.is_verified:
            out[b.number] = b
    verified = [r for r in done if r.is_verified and r.feasible and r.median_ms is not None]
    front = pareto_front(verified)
    for r in done:
        if r.is_verified or not r.feasible or r.number in out:
            continue
        ci = r.paired_ci
        optimistic = r.in_study_ms if ci is None or r.paired_speedup is None or r.in_study_ms is None else (
            r.in_study_ms * r.paired_speedup / max(ci[1], 1e-9))
        if optimistic is None:
            continue
        dominated = any(
            o.value >= r.value and o.median_ms <= optimistic and (o.value > r.value or o.median_ms < optimistic)  # type: ignore[operator]
            for o in front
        )
        if not dominated:
            out[r.number] = r
    winner = choose_winner(recs, max_drop, min_speedup).record
    if winner is not None and not winner.is_verified:
        out[winner.number] = winner
    return sorted(out.values(), key=lambda r: r.number)


def verify_study(
    ctx: StudyContext, study: optuna.Study, settings: VerifySettings, force: bool = True, backend: Backend | None = None,
    refuse_under_load: bool = False,
) -> VerifyResult | None:
    """Run the tournament to a fixed point and store its figures in the study; None when there is nothing (new) to verify.

    Round 1 times FP32, all-INT8, the in-study front and its noise band; each later round
    times, in the same kind of tournament with FP32 as the reference, what the verified
    figures so far leave unverified (:func:`still_unverified`), until front, winner and
    both baselines are verified together or :data:`MAX_VERIFY_ROUNDS` is reached. One arm per
    latency class: every member of a timed class gets its figure. Every round carries the A/A
    control (an FP32 copy built as trials are) and load-aware timing.

    ``force=False`` (after ``run``) skips the tournament when the same trials were verified already.
    ``refuse_under_load`` (``sensisearch verify`` without ``--force``): raise :class:`VerifyRefused`
    when the machine is busier than the sessions allow; otherwise figures taken under load are marked.
    ``backend`` (stage 2, ``verify --backend B``): build every chosen trial's ``deployable.onnx``
    with it into ``RUN_DIR/verify/<backend>/<trial>/`` and time those. Without it the study's
    own artifacts are timed, which a study with predicted latency only does when this
    backend is the target (else the tournament is skipped with one line saying what to run).
    """
    from sensisearch.study.trial._predicted import runs_on_target

    if backend is None and not runs_on_target(ctx.pipeline.predictor, ctx.backend):
        profile = ctx.backend.profile.name
        log.warning(
            "verify: skipped: this study's latency is predicted for %s, and %s here is not that target; on the target "
            "run `sensisearch verify %s --backend %s`", profile, ctx.backend.name, ctx.out, profile,
        )
        return None
    usable_file = "artifact" if backend is None else "deployable"
    recs = records(study)
    from sensisearch.study.search._guided import speed_trials

    chosen = select_for_verification(recs, usable_file=usable_file, nominated=speed_trials(study.get_trials(deepcopy=False)))
    if len(chosen) < 2:
        log.warning("verify: needs the FP32 baseline and at least one other complete trial with its artifact")
        return None
    previous = read_verified(study.user_attrs)
    if not force and set(previous) >= {r.number for r in chosen} and previous:
        log.info("verify: trials %s were verified already", sorted(previous))
        return None
    policy = verify_load_policy(ctx)
    verdict = check_quiet(policy, max_wait_s=policy.max_wait_s if refuse_under_load else 0.5)
    if not verdict.quiet and refuse_under_load:
        raise VerifyRefused(refusal_line(verdict, policy))
    # What a progress line during the tournament says runs now.
    with doing(f"verify tournament of {len(chosen)} trials"):
        return _to_fixed_point(ctx, study, settings, chosen, backend, usable_file, policy, verdict)


def _to_fixed_point(
    ctx: StudyContext, study: optuna.Study, settings: VerifySettings, chosen: list[TrialRecord], backend: Backend | None,
    usable_file: str, policy: LoadPolicy, verdict: QuietVerdict,
) -> VerifyResult:
    """Tournament rounds until front, winner and both baselines are verified (or :data:`MAX_VERIFY_ROUNDS`)."""
    forced_loaded = not verdict.quiet
    fp32 = chosen[0]
    entries: dict[int, Verification] = {}
    timings: dict[int, list[Verification]] = {}
    """Every verify timing of each trial, oldest first (:func:`settle` keeps one)."""
    done_rounds: list[TournamentRound] = []
    pending = chosen
    max_drop, min_speedup = ctx.settings.acceptance.max_drop, ctx.settings.acceptance.min_speedup
    for _ in range(MAX_VERIFY_ROUNDS):
        done_rounds.append(_tournament(ctx, study, settings, backend, fp32, pending, usable_file, entries, timings, policy, forced_loaded))
        for key, value in verified_attrs(entries).items():
            study.set_user_attr(key, value)
        usable = _usable(records(study), usable_file)
        missing = still_unverified(usable, max_drop, min_speedup)
        wide_left = unsettled(timings, {r.number: _in_study_figure(r, fp32) for r in usable})
        pending = missing + [r for r in usable if r.number in wide_left and r.number not in {m.number for m in missing}]
        if not pending:
            break
        pending = [fp32, *(r for r in pending if r.number != fp32.number)]
    left = [r.number for r in missing]
    summary = {
        "rounds": [t.to_dict() for t in done_rounds], "converged": not left, "unverified": left, "unsettled": wide_left,
        "forced_under_load": forced_loaded, "before": verdict.to_dict(),
        "under_load": forced_loaded or any(t.under_load for t in done_rounds),
    }
    study.set_user_attr(VERIFY_SUMMARY_ATTR, summary)
    if left:
        log.warning("verify: after %d rounds trials %s still matter and are not verified", len(done_rounds), left)
    if wide_left:
        log.warning("verify: after %d rounds the figures of trials %s are still unsettled (no two timings agree within "
                    "%.0f%% with a narrow CI): the machine was disturbed; verify again when it is quiet",
                    len(done_rounds), wide_left, 100 * SETTLED_CI_WIDTH)
    _store_prediction_check(study, (backend or ctx.backend).name)
    first = done_rounds[0]
    return VerifyResult(tuple(sorted(entries)), fp32.number, sum(t.seconds for t in done_rounds), first.rounds,
                        tournaments=len(done_rounds), unverified=tuple(left), under_load=summary["under_load"],
                        control=first.control, unsettled=tuple(wide_left))


def _tournament(
    ctx: StudyContext, study: optuna.Study, settings: VerifySettings, backend: Backend | None, fp32: TrialRecord,
    chosen: list[TrialRecord], usable_file: str, entries: dict[int, Verification], timings: dict[int, list[Verification]],
    policy: LoadPolicy, forced_loaded: bool,
) -> TournamentRound:
    """Time one arm per latency class of ``chosen`` (FP32 the reference, plus the A/A control); add an entry
    for every usable member of those classes to ``entries``."""
    usable = _usable(records(study), usable_file)
    # Every chosen member of a class may stand for it: if one's files went (another worker sharing the study prunes
    # its own trials' artifacts, --keep-artifacts, while this one verifies), the next one is timed instead.
    candidates_of: dict[str, list[TrialRecord]] = {}
    for r in chosen:
        candidates_of.setdefault(_class_of(r), []).append(r)
    # The reference is FP32's own arm; FP32's class (the FP32 baseline) is timed as the reference.
    fp32_class = _class_of(fp32)
    candidates_of[fp32_class] = [fp32]
    arms_of: dict[str, TrialRecord] = {}
    runners: dict[str, Runner] = {}
    on = (backend or ctx.backend).timing_backend()
    try:
        note_step("building and loading artifacts" if backend is not None else "loading artifacts")
        for cls, candidates in candidates_of.items():
            for r in candidates:
                runner = _load_arm(ctx, on, backend, r, usable_file)
                if runner is not None:
                    arms_of[cls], runners[str(r.number)] = r, runner
                    break
        if fp32_class not in arms_of:
            raise SensisearchError(f"verify: the FP32 baseline's {usable_file} (trial {fp32.number}) is gone; "
                                   f"run the study again to rebuild it")
        runners[CONTROL_ARM] = on.load(_control_artifact(ctx, backend))
        feeds = ctx.pipeline.timing_feeds()
        arms = {name: ctx.pipeline.arm(runner, feeds) for name, runner in runners.items()}
        log.info("verify: tournament of trials %s (reference: FP32 trial %d, with the A/A control)", list(arms), fp32.number)
        timing = dataclasses.replace(settings.timing(), runs_per_round=runs_per_round(arms))
        note_step(f"timing, at most {format_seconds(timing.max_seconds)}")
        for attempt in range(2):
            timed = time_interleaved(arms, str(fp32.number), timing, load=policy)
            control = control_result(timed.pop(CONTROL_ARM))
            if control.ok:
                break
            log.info("verify: A/A control %.3fx [%.3f, %.3f] off 1.00: timing the round again", control.ratio, *control.ci95)
            timing = dataclasses.replace(timing, seed=timing.seed + 1)
        facts = runners[str(fp32.number)].timing_facts()
    finally:
        for runner in runners.values():
            runner.close()
    reference_ms = read_reference_ms(study.user_attrs) or timed[str(fp32.number)].reference_median_ms
    note_step("drop CIs")
    members = [r for r in usable if _class_of(r) in arms_of]
    drops = _drop_cis(study, members, fp32, settings)
    control_dict = {**control.to_dict(), "corrected": not control.ok}
    control_dict["paired"] = {k: v for k, v in control_dict["paired"].items() if k != "candidate_times_ms"}
    under_load = forced_loaded or any(p.load_record is not None and p.load_record.under_load for p in timed.values())
    for r in members:
        source = arms_of[_class_of(r)]
        paired: PairedLatency = timed[str(source.number)]
        if not control.ok and source.number != fp32.number:
            paired = corrected(paired, control)
        entry = dataclasses.replace(
            PairedTiming.of(paired, facts, median_ms=paired.median_ms_for(reference_ms), backend=on.name),
            timed_as=source.number, control=control_dict, under_load=under_load, forced_under_load=forced_loaded,
        )
        drop = drops.get(r.number)
        history = timings.setdefault(r.number, [])
        history.append(Verification(entry, None if drop is None else (drop[0], drop[1])))
        kept, _ = settle(history, _in_study_figure(r, fp32))
        if entries.get(r.number) is not kept:
            entries[r.number] = kept
            _write_verified_json(r, kept.timing, None if kept.drop_ci95 is None else list(kept.drop_ci95))
    first = timed[str(fp32.number)]
    return TournamentRound(tuple(sorted(r.number for r in members)), tuple(r.number for r in arms_of.values()),
                           first.rounds, first.seconds, control_dict, under_load)


def _load_arm(
    ctx: StudyContext, on: Backend, backend: Backend | None, r: TrialRecord, usable_file: str
) -> Runner | None:
    """Trial ``r``'s runner for a tournament; None when its file was removed since it was chosen."""
    try:
        artifact = Path(r.artifact) if backend is None else _build_on(ctx, backend, r)  # type: ignore[arg-type]
        return on.load(artifact)
    except SensisearchError:
        if _has_file(r, usable_file):
            raise  # a real build or load failure, not a file that went away
        log.warning("verify: trial %d's %s was removed while verify ran (pruned by the worker that made it, "
                    "--keep-artifacts): not timed", r.number, usable_file)
        return None


def _control_artifact(ctx: StudyContext, backend: Backend | None) -> Path:
    """The A/A control for the tournament: the all-FP32 configuration emitted and built as a trial is,
    into ``RUN_DIR/verify/control/`` (with stage 2's backend when one is given)."""
    from sensisearch.quantize.config import Precision, TrialConfig

    config = TrialConfig.uniform(ctx.info.layer_names, Precision.FP32)
    out_dir = ctx.out / "verify" / ("control" if backend is None else f"{backend.name}-control")
    deployable, _ = ctx.pipeline.emit(config, out_dir)
    if backend is None:
        return Path(ctx.pipeline.build(deployable, out_dir, config).artifact)
    return Path(backend.build(deployable, out_dir, trial_config=config.to_dict(), layer_names=ctx.info.layer_names).artifact)


def _build_on(ctx: StudyContext, backend: Backend, r: TrialRecord) -> Path:
    """Stage 2: trial ``r``'s deployable ONNX built by ``backend`` into ``RUN_DIR/verify/<backend>/<trial>/``."""
    from sensisearch.study.store._results import trial_file

    deployable = trial_file(r.deployable, ctx.out, r.number)
    assert deployable is not None
    out_dir = ctx.out / "verify" / backend.name / f"{r.number:04d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    built = backend.build(
        deployable, out_dir, trial_config=None if r.config is None else r.config.to_dict(), layer_names=ctx.info.layer_names
    )
    log.info("verify: trial %d built by %s in %.1f s", r.number, backend.name, built.seconds)
    return Path(built.artifact)


def _store_prediction_check(study: optuna.Study, backend_name: str) -> None:
    """How far the in-study speed-ups (predicted or paired) were from the verified ones, as a study attribute."""
    from sensisearch.study.trial._predicted import compare_predicted
    from sensisearch.study.store._record import prediction_check_attrs

    check = compare_predicted(records(study), backend_name)
    if check is None:
        return
    log.info("verify: %s", check.summary())
    for key, value in prediction_check_attrs(check).items():
        study.set_user_attr(key, value)


def verify_backend(ctx: StudyContext, name: str) -> Backend:
    """Stage 2's backend ``name`` (onnxruntime, tensorrt, ...), emitting the study's quantization profile.

    The same factory as ``run``: TensorRT here takes exactly the path ONNX Runtime does.
    """
    from sensisearch.backends.factory import choose_backend
    from sensisearch.backends.factory import with_profile

    choice = choose_backend(dataclasses.replace(ctx.backend_settings, name=name), ctx.out)
    if not choice.can_run:
        raise SensisearchError(f"--backend {name}: cannot run engines here ({choice.run_reason}); run verify on the target machine")
    backend, _ = with_profile(choice.backend, ctx.backend.profile.name)
    return backend


def _drop_cis(study: optuna.Study, chosen: list[TrialRecord], fp32: TrialRecord, settings: VerifySettings) -> dict[int, list[float]]:
    """Drop CIs with ``settings.drop_resamples`` resamples for every chosen trial with per-image results."""
    encoded = read_fp32_per_image(study.user_attrs)
    if encoded is not None:
        reference = _accuracy.decode(encoded)
    elif fp32.per_image and Path(fp32.per_image).is_file():
        reference = _accuracy.load_per_image(Path(fp32.per_image))
    else:
        return {}
    out: dict[int, list[float]] = {}
    bootstraps: dict[str, PairedBootstrap | None] = {}  # per metric: the FP32 side computed once
    for r in chosen:
        if not r.per_image or not Path(r.per_image).is_file() or r.metric is None:
            continue
        if r.metric not in bootstraps:
            bootstraps[r.metric] = _accuracy.drop_bootstrap(reference, r.metric, settings.drop_resamples, settings.seed)
        estimate = _accuracy.estimate_with(bootstraps[r.metric], _accuracy.load_per_image(Path(r.per_image)), r.metric)
        if estimate is not None:
            out[r.number] = [estimate.ci95[0], estimate.ci95[1]]
    return out


def _write_verified_json(r: TrialRecord, timing: PairedTiming, drop_ci95: list[float] | None) -> None:
    """``verified.json`` beside the trial's ``trial.json``, which stays as the trial wrote it (see VERIFIED_FILE)."""
    if not r.trial_json or not Path(r.trial_json).is_file():
        return
    write_json_atomic(Path(r.trial_json).with_name(VERIFIED_FILE), {
        "number": r.number, "backend": timing.backend,
        "median_ms": timing.median_ms, "speedup": timing.speedup, "speedup_ci95": list(timing.speedup_ci95),
        "candidate_median_ms": timing.candidate_median_ms, "reference_median_ms": timing.reference_median_ms,
        "rounds": timing.rounds, "drop_ci95": drop_ci95,
    })


# --------------------------------------------------------------------------- run settings for `verify RUN_DIR`
def save_run_settings(settings: StudySettings, out: Path) -> Path:
    """``out/settings.json``: what ``sensisearch verify RUN_DIR`` needs to reopen the study (absolute paths)."""
    return write_json_atomic(out / SETTINGS_FILE, settings.with_absolute_paths().to_dict())


def load_run_settings(
    run_dir: Path, storage: str | None = None, study_name: str | None = None, overrides: Mapping[str, Any] | None = None
) -> StudySettings:
    """The settings stored in ``run_dir``'s study (``sensisearch.study.store._worker.SETTINGS_ATTR``), with its output
    folder (and optionally storage) overridden, and ``overrides`` (this host's paths, None: not given);
    ``RUN_DIR/settings.json`` only for runs made before settings were stored in the study."""
    from sensisearch.study.store._finished import open_finished_run, run_settings
    from sensisearch.study.store._worker import SETTINGS_ATTR

    if not run_dir.is_dir():
        raise SensisearchError(f"{run_dir}: no such run folder; pass the --out folder of a `sensisearch run`")
    if storage is not None or (run_dir / "study.db").is_file():
        run = open_finished_run(run_dir, storage, study_name)
        if run.study.user_attrs.get(SETTINGS_ATTR) is not None:
            return run_settings(run, {}, dict(overrides or {}))
    return _load_settings_file(run_dir, storage, study_name)


def _load_settings_file(run_dir: Path, storage: str | None, study_name: str | None) -> StudySettings:
    """The fallback for old runs: ``RUN_DIR/settings.json``."""
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        raise SensisearchError(f"{path}: not found; run the study once with this version of `sensisearch run` to write it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SensisearchError(f"{path}: not valid JSON ({exc}); re-run `sensisearch run` to rewrite it") from exc
    # Nested (StudySettings.to_dict) or flat (earlier releases).
    known = setting_names()
    values = {k: v for k, v in flat_settings(data).items() if k in known and v is not None}
    # Without a storage of its own the study lives in RUN_DIR/study.db (prepare's default for --out).
    flags: dict[str, Any] = {"out": run_dir, "storage": storage, "study_name": study_name}
    return merge_settings(values, flags, None)
