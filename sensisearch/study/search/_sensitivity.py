"""Which layers matter: per-layer INT8 sensitivity and per-tensor calibration sensitivity.

Two probes per quantizable layer, both scored by the study's evaluator (on a fast
evaluation subset) through the study's own :class:`~sensisearch.artifact.ArtifactPipeline`,
so a probe is exactly the deployable graph a trial would build:

* **only this layer INT8** (the rest FP32): the damage the layer does on its own;
* **all INT8 except this layer** (it stays FP32): how much keeping it in float
  recovers from all-INT8, i.e. the damage it does in context.

INT8 kernels are not faster everywhere: the MNIST CNN's first conv (one input
channel) runs slower in INT8 on ONNX Runtime's CPU kernels, and "all-INT8 but
that conv" is the fastest configuration there, which a ranking by accuracy
proposes by chance only. So in a study timed here (no latency predictor), every
all-but-this-layer probe is also timed briefly, interleaved with an all-INT8
build (:data:`PROBE_TIMING_SECONDS`): a layer whose model gets significantly
faster when it alone goes back to float is *faster in float*
(:func:`faster_in_float`). Timed against all-INT8 in the same rounds, not each
against FP32 at its own moment: on the 2-core machine, the all-INT8 speed-up over
FP32 read 2.31x in a probe and 2.10x in a trial minutes later, a shift as large
as the gain to detect.

The ranking (:func:`rank_layers`) is a pure function of the probe scores. The
marginal "what each choice did" table of the report averages over random trials;
these probes change one layer at a time, which is what an exclude list needs.

Per activation tensor, :func:`~sensisearch.calibration.spread.threshold_spread`
gives its threshold under each calibration algorithm: a tensor whose clipping
thresholds sit far below its min-max "needs clipping".

The profile is cached in ``<out>/sensitivity.json`` under a key of everything
the scores depend on (model, data, profile, calibration search, evaluation subset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from sensisearch.progress import PhaseProgress
from sensisearch.calibration.spread import DEFAULT_SPREAD_PERCENTILES, threshold_spread
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig

if TYPE_CHECKING:
    import optuna

    from sensisearch.backends.base import Runner
    from sensisearch.calibration.ranges import CalibrationRanges
    from sensisearch.evaluation.base import EvaluationResult
    from sensisearch.study.search._space import SearchSpace
    from sensisearch.study.trial._isolation import IsolationSettings
    from sensisearch.study.trial._pipeline import TrialPipeline

log = logging.getLogger(__name__)

SENSITIVITY_FILE = "sensitivity.json"
STUDY_ATTR = "sensitivity"
PROBE_BATCH = 32
"""Inputs whose outputs give each probe's :attr:`LayerProbe.distortion`."""
NEEDS_CLIPPING_BELOW = 0.5
"""A tensor "needs clipping" when some algorithm's amax is below this fraction of
its min-max amax: min-max would then spend more than half of the INT8 levels on
outliers."""


@dataclass(frozen=True)
class SensitivityInputs:
    """What the probes need from a prepared study, and nothing more.

    ``key`` is everything the probe scores depend on beyond these parts (data,
    evaluation subset, seed): a cached profile is reused only when it matches.
    """

    pipeline: TrialPipeline
    """The study's own pipeline: a probe is exactly the deployable graph a trial would build."""
    space: SearchSpace
    calibration: CalibrationRanges | None
    out: Path
    """Where ``sensitivity.json`` and the probes' scratch folder go."""
    key: Mapping[str, Any]
    latency_batch: int = 1
    """The batch to fall back on when the evaluator cannot give :data:`PROBE_BATCH` inputs."""
    classification: bool = False
    """A classifier's metric moves in steps of one image (the ranking's resolution)."""
    isolation: IsolationSettings | None = None
    """Each probe in a forked child with these deadlines (a crashing builder fails that probe, not the
    study), as trials run under ``--isolation process``; None: in this process."""
    budget: int | None = None
    """The study's ``--budget``: the probes spend at most :data:`PROBE_BUDGET_SHARE` of it
    (:func:`probe_plan`); None: every probe (``sensisearch sensitivity``)."""


# --------------------------------------------------------------------------- pure ranking
@dataclass(frozen=True)
class LayerProbe:
    """Metric (points) of the two probes of one layer."""

    layer: str
    only_int8: float | None
    """Only this layer INT8, every other layer FP32; None: not scored (the probes' budget share
    left room for its output distortion only)."""
    all_but: float
    """Every layer INT8 except this one (FP32)."""
    distortion: float = 0.0
    """Relative squared error of the model outputs vs FP32 with only this layer INT8,
    on a fixed probe batch: a continuous signal where the metric moves by less
    than its resolution (one sample)."""
    revert_speedup: tuple[float, float, float] | None = None
    """The all-but-this-layer probe's speed-up over all-INT8, timed interleaved with it (median, 95% CI low,
    high; > 1: the model is faster with this layer in float); None: not timed."""


@dataclass(frozen=True)
class LayerSensitivity:
    """One ranked row: drops are in points of the metric, positive = INT8 hurts."""

    layer: str
    rank: int
    """1 = most sensitive."""
    alone_drop: float | None
    """FP32 metric minus the only-this-layer-INT8 metric (None: not scored, see :attr:`LayerProbe.only_int8`)."""
    recovery: float
    """All-but-this-layer metric minus the all-INT8 metric."""
    score: float
    """``alone_drop + recovery``: the damage in isolation plus the damage in context (``recovery`` alone
    where the layer's alone drop was not scored)."""
    distortion: float = 0.0
    """:attr:`LayerProbe.distortion`."""
    revert_speedup: tuple[float, float, float] | None = None
    """:attr:`LayerProbe.revert_speedup`."""


def rank_layers(
    probes: Sequence[LayerProbe], fp32: float, all_int8: float, resolution: float = 0.0
) -> list[LayerSensitivity]:
    """Layers from most to least sensitive.

    Score = (FP32 - only-this-layer-INT8) + (all-but-this-layer - all-INT8).
    Both terms are the same quantity seen from the two ends of the space (one
    layer INT8 in a float model, one layer float in an INT8 model); summing them
    keeps a layer that only hurts in combination (a shared activation) and one
    that hurts on its own. A score up to ``2 * resolution`` (two samples of the
    evaluation set for a classifier, ``100 / count`` points each) is no measurable effect:
    such layers are ordered by their output distortion instead, which is
    continuous, so the tail of the ranking is not decided by a single image's
    flip. Remaining ties keep the probes' order (graph order). A layer whose alone
    probe was not scored (``only_int8`` None) is ranked by its recovery.
    """
    scored = []
    for order, probe in enumerate(probes):
        alone = None if probe.only_int8 is None else fp32 - probe.only_int8
        recovery = probe.all_but - all_int8
        score = (alone or 0.0) + recovery
        # An apparent gain from INT8 (negative score) is noise at this scale.
        measurable = score if score > 2 * resolution else 0.0
        scored.append((-measurable, -probe.distortion, order, probe, alone, recovery))
    scored.sort(key=lambda row: row[:3])
    return [
        LayerSensitivity(
            layer=probe.layer, rank=i + 1, alone_drop=alone, recovery=recovery, score=(alone or 0.0) + recovery,
            distortion=probe.distortion, revert_speedup=probe.revert_speedup,
        )
        for i, (_, _, _, probe, alone, recovery) in enumerate(scored)
    ]


MIN_REVERT_GAIN = 0.03
"""A layer is faster in float when its all-but-this-layer probe is at least this much faster than all-INT8
(and the CI excludes 1): below it, a second's timing cannot tell a gain from the machine's drift."""


def faster_in_float(layers: Sequence[LayerSensitivity], min_gain: float = MIN_REVERT_GAIN) -> dict[str, float]:
    """Layers whose return to float alone makes the all-INT8 model faster: layer -> speed-up over all-INT8, largest first.

    A layer counts when its :attr:`~LayerSensitivity.revert_speedup` is at least ``1 + min_gain`` and its
    95% CI lies wholly above 1. Layers not timed never count.
    """
    gains = {
        row.layer: row.revert_speedup[0]
        for row in layers
        if row.revert_speedup is not None and row.revert_speedup[1] > 1.0 and row.revert_speedup[0] >= 1.0 + min_gain
    }
    return dict(sorted(gains.items(), key=lambda item: -item[1]))


def output_distortion(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """sum ||y - y_ref||^2 / sum ||y_ref||^2 over every output (0 = identical to FP32)."""
    num = sum(float(np.sum((np.asarray(y, np.float64) - np.asarray(r, np.float64)) ** 2)) for y, r in zip(outputs, reference))
    den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in reference)
    return num / den if den > 0 else num


@dataclass(frozen=True)
class TensorSensitivity:
    """One activation tensor's threshold under each calibration algorithm."""

    tensor: str
    amax: dict[str, float]
    """:func:`~sensisearch.calibration.spread.calibration_label` -> amax."""
    strongest: str
    """The label that clips it most."""
    clipping: float
    """That label's amax / min-max amax (1.0 = no clipping)."""
    needs_clipping: bool


@dataclass
class SensitivityProfile:
    """Everything ``sensisearch sensitivity`` measured, JSON round-trippable."""

    key: dict[str, Any]
    metric: str
    calibration: dict[str, Any]
    """The ``CalibrationChoice.to_dict()`` every probe used (the best all-INT8 one on the subset)."""
    fp32: float
    all_int8: float
    layers: list[LayerSensitivity]
    tensors: list[TensorSensitivity] = field(default_factory=list)
    calibration_scores: dict[str, float] = field(default_factory=dict)
    """All-INT8 metric per calibration choice tried (label -> points)."""
    eval_count: int = 0
    """Images each probe scored (the subset's size when the probes ran on one)."""
    probes: int = 0
    """Probe evaluations run (each a build and an evaluation)."""
    cost_trials: float = 0.0
    """Images the probes scored, in full evaluations: their share of ``--budget``."""
    seconds: float = 0.0
    """Wall time of the probes (every comparison counts it)."""
    rescored: list[str] = field(default_factory=list)
    """Layers scored again on every image (close to the ranking's decision on the subset)."""
    failed: list[str] = field(default_factory=list)
    """Probes whose configuration did not build or run (``"<probe>: <reason>"``), scored as 0."""

    @property
    def faster_in_float(self) -> dict[str, float]:
        """:func:`faster_in_float` of this profile."""
        return faster_in_float(self.layers)

    @property
    def ranking(self) -> list[str]:
        return [row.layer for row in sorted(self.layers, key=lambda r: r.rank)]

    @property
    def calibration_choice(self) -> CalibrationChoice:
        return CalibrationChoice.from_dict(self.calibration)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "metric": self.metric,
            "calibration": self.calibration,
            "fp32": self.fp32,
            "all_int8": self.all_int8,
            "eval_count": self.eval_count,
            "probes": self.probes,
            "cost_trials": self.cost_trials,
            "seconds": self.seconds,
            "rescored": list(self.rescored),
            "failed": list(self.failed),
            "calibration_scores": self.calibration_scores,
            "layers": [asdict(r) for r in self.layers],
            "tensors": [asdict(t) for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityProfile:
        return cls(
            key=dict(data["key"]),
            metric=data["metric"],
            calibration=dict(data["calibration"]),
            fp32=float(data["fp32"]),
            all_int8=float(data["all_int8"]),
            layers=[LayerSensitivity(**{**r, "revert_speedup": _triple(r.get("revert_speedup"))}) for r in data["layers"]],
            tensors=[TensorSensitivity(**t) for t in data.get("tensors", [])],
            calibration_scores={k: float(v) for k, v in data.get("calibration_scores", {}).items()},
            eval_count=int(data.get("eval_count", 0)),
            probes=int(data.get("probes", 0)),
            cost_trials=float(data.get("cost_trials", 0.0)),
            seconds=float(data.get("seconds", 0.0)),
            rescored=list(data.get("rescored", [])),
            failed=list(data.get("failed", [])),
        )


def _triple(value: Sequence[float] | None) -> tuple[float, float, float] | None:
    """A stored (median, low, high) speed-up (JSON keeps it as a list)."""
    if value is None:
        return None
    median, low, high = (float(v) for v in value)
    return median, low, high


def spearman(a: Sequence[str], b: Sequence[str]) -> float:
    """Spearman rank correlation of two rankings of the same names (no ties in a ranking)."""
    from sensisearch.measure import spearman_rho

    if sorted(a) != sorted(b):
        raise ValueError("the two rankings name different layers")
    position = {name: i for i, name in enumerate(b)}
    rho = spearman_rho(list(range(len(a))), [position[n] for n in a])
    return 1.0 if rho is None else rho  # fewer than 3 names: the rankings agree or it means nothing


# --------------------------------------------------------------------------- probes (real builds)
def score_config(
    pipeline: TrialPipeline,
    config: TrialConfig,
    work_dir: Path,
    probe_feeds: Mapping[str, np.ndarray] | None = None,
    positions: np.ndarray | None = None,
) -> tuple[EvaluationResult, list[np.ndarray]]:
    """Accuracy only: emit, build, load and evaluate ``config`` (no latency), then delete the files.

    The same emit/build path as a study trial, so the score is that of exactly
    the deployable graph the profile produces. Also returns the outputs on
    ``probe_feeds`` (empty without them). ``positions``: score only these images
    (the probes' fixed subset, :meth:`~sensisearch.evaluation.base.Evaluator.evaluate_part`).
    """
    with _built(pipeline, config, work_dir) as (runner, _):
        return _evaluated(pipeline, runner, positions), ([] if probe_feeds is None else _run_probe(runner, probe_feeds))


def _evaluated(pipeline: TrialPipeline, runner: Runner, positions: np.ndarray | None) -> EvaluationResult:
    if positions is not None:
        return pipeline.evaluator.evaluate_part(runner, positions).result
    return pipeline.evaluator.evaluate(runner)


@contextlib.contextmanager
def _built(pipeline: TrialPipeline, config: TrialConfig, work_dir: Path) -> Iterator[tuple[Runner, Path]]:
    """``config`` emitted, built and loaded in ``work_dir`` (deleted afterwards): the trial's own path.
    Yields the loaded runner and its artifact."""
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        deployable, _ = pipeline.emit(config, work_dir)
        build = pipeline.build(deployable, work_dir, config)
        with pipeline.backend.load(build.artifact) as runner:
            yield runner, build.artifact
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


PROBE_RESULT_NAME = "probe.npz"
PROBE_TIMING_SECONDS = 1.0
"""Cap on a probe's timing against all-INT8: a screen for layers faster in float, which a trial then times in full.
The MNIST CNN's first conv in float: 1.13x [1.10, 1.15] and 1.14x [1.11, 1.16] over all-INT8 in two studies'
probes, each within this second."""


class ProbeScore(NamedTuple):
    value: float | None
    """The metric (None: outputs only, see ``metric`` of :func:`score_probe`)."""
    count: int
    """Images scored."""
    outputs: list[np.ndarray]
    """The outputs on the probe batch."""
    speedup: tuple[float, float, float] | None = None
    """Speed-up over the ``timed_against`` build (median, 95% CI) when timed."""


def score_probe(
    inputs: SensitivityInputs,
    config: TrialConfig,
    work_dir: Path,
    probe_feeds: Mapping[str, np.ndarray] | None = None,
    positions: np.ndarray | None = None,
    metric: bool = True,
    timed_against: Path | None = None,
) -> ProbeScore:
    """The metric, images scored and outputs on ``probe_feeds`` of :func:`score_config`, in a forked child
    when ``inputs.isolation`` is set (raising :class:`~sensisearch.study.trial._isolation.TrialProcessError`
    when the child crashes, exits or passes its deadline). ``metric=False``: the outputs only
    (metric None, no image scored). ``timed_against``: also time the probe interleaved with this built
    artifact (:meth:`~sensisearch.study.trial._pipeline.TrialPipeline.time_against`)."""
    pipeline = inputs.pipeline

    def scored() -> ProbeScore:
        with _built(pipeline, config, work_dir) as (runner, artifact):
            outputs = [] if probe_feeds is None else _run_probe(runner, probe_feeds)
            result = _evaluated(pipeline, runner, positions) if metric else None
            speedup = None
            if timed_against is not None:
                paired = pipeline.time_against(runner, artifact, timed_against, PROBE_TIMING_SECONDS)
                speedup = (paired.speedup, *paired.speedup_ci95)
            return ProbeScore(None if result is None else result.value, 0 if result is None else result.count, outputs, speedup)

    if inputs.isolation is None:
        return scored()
    from sensisearch.study.trial._isolation import run_forked

    scratch = work_dir.with_name(work_dir.name + "-hand-off")
    shutil.rmtree(scratch, ignore_errors=True)

    def probe(folder: Path) -> None:
        value, count, outputs, speedup = scored()
        arrays = {f"output_{i}": np.asarray(o) for i, o in enumerate(outputs)}
        np.savez(folder / PROBE_RESULT_NAME, value=np.float64(np.nan if value is None else value), count=np.int64(count),
                 speedup=np.asarray(speedup if speedup is not None else [np.nan] * 3, np.float64), **arrays)

    try:
        # One deadline for the probe's build and its evaluation (a subset of the images at most).
        run_forked(probe, scratch, inputs.isolation.build_timeout + inputs.isolation.eval_timeout, "probe",
                   flag="--build-timeout plus --eval-timeout")
        with np.load(scratch / PROBE_RESULT_NAME) as data:
            outputs = [data[f"output_{i}"] for i in range(sum(k.startswith("output_") for k in data.files))]
            value = float(data["value"])
            timing = data["speedup"]
            return ProbeScore((None if np.isnan(value) else value), int(data["count"]), outputs,
                              None if np.isnan(timing).any() else _triple(timing.tolist()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)  # a child that crashed left its build behind


def _run_probe(runner: Runner, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs on the probe batch; sample by sample when the model fails at that batch.

    Some exports declare a dynamic batch but hard-code batch 1 inside (YOLOv5 v7.0's
    Reshapes); the evaluator runs those one image at a time, and so do the probes.
    """
    try:
        return runner.run(feeds)
    except Exception:
        batch = len(next(iter(feeds.values())))
        parts = [runner.run({name: array[i:i + 1] for name, array in feeds.items()}) for i in range(batch)]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


def _probe_feeds(inputs: SensitivityInputs) -> Mapping[str, np.ndarray]:
    info, evaluator = inputs.pipeline.info, inputs.pipeline.evaluator
    # A static-batch model (YOLOv5 exports) only takes its own batch size.
    batch = info.inputs[0].shape[0] if info.inputs and info.inputs[0].shape else None
    try:
        return evaluator.latency_feeds(PROBE_BATCH if batch is None else int(batch))
    except Exception:  # an evaluator that cannot give that batch: its latency batch then
        return evaluator.latency_feeds(inputs.latency_batch)


def tensor_sensitivity(
    inputs: SensitivityInputs, samples: int, percentiles: Sequence[float] = DEFAULT_SPREAD_PERCENTILES
) -> list[TensorSensitivity]:
    """Per tensor any profile may quantize: its amax under each algorithm at ``samples`` calibration samples."""
    from sensisearch.quantize.placement import statistics_tensors

    if inputs.calibration is None:
        return []
    table = inputs.calibration.table
    resolved = table.resolve_samples(samples)
    pipeline = inputs.pipeline
    names = statistics_tensors(pipeline.model, pipeline.info, pipeline.index)
    stats = {name: table.statistics(name, resolved) for name in names}
    rows = []
    for t in threshold_spread(stats, inputs.space.algorithms, percentiles):
        label, ratio = t.strongest_clipping
        rows.append(TensorSensitivity(t.tensor, dict(t.amax), label, ratio, ratio < NEEDS_CLIPPING_BELOW))
    return rows


def _label(choice: CalibrationChoice) -> str:
    from sensisearch.calibration.spread import calibration_label

    return calibration_label(choice.algorithm, choice.percentile)


PROBE_SUBSET_FRACTION = 0.125
"""Probes score this fraction of the evaluation images first (at least :data:`PROBE_SUBSET_MIN`)."""
PROBE_SUBSET_MIN = 8
MAX_RESCORED = 4
"""At most this many layers, the closest to the cut, are scored again on every image (2 full evaluations each)."""
CLOSE_FRACTION = 0.25
""""Close": within this fraction of the cut score (or two images of a classifier's subset) of it."""


PROBE_BUDGET_SHARE = 0.3
"""The probes spend at most this share of the study's ``--budget`` (images scored, in full evaluations):
the rest is the search's. On a small evaluation set every probe costs nearly a trial's build, so
without a cap the probes took up to 35 of 50 trials (YOLOv5n, 40 images)."""


@dataclass(frozen=True)
class ProbePlan:
    """Which optional probes fit the probes' share of the budget (:func:`probe_plan`)."""

    score_alone: bool
    """Score each only-this-layer-INT8 probe's metric (else its output distortion only)."""
    rescored: int
    """At most this many layers close to the ranking's cut are scored again on every image."""


def probe_plan(layers: int, algorithms: int, per_probe: int, total: int | None, budget: int | None, subset: bool) -> ProbePlan:
    """What the probes can afford within :data:`PROBE_BUDGET_SHARE` of ``budget`` trials of ``total`` images.

    Always (the ranking's core): FP32, all-INT8 under each of the ``algorithms`` and every
    all-but-this-layer probe, ``per_probe`` images each; putting one unit back to float is
    the move the guided search makes, so these probes say most about its choices. Then,
    while room is left: the only-this-layer-INT8 probes' metric (their output distortion is
    measured anyway), then the rescoring on every image (2 references, then 1 or 2
    evaluations per layer). No ``budget`` or image count: everything, as before the cap.
    """
    most_rescored = max(2, min(MAX_RESCORED, layers // 8)) if subset else 0
    if budget is None or not total:
        return ProbePlan(True, most_rescored)
    room = PROBE_BUDGET_SHARE * budget * total - (1 + algorithms + layers) * per_probe
    score_alone = room >= layers * per_probe
    if score_alone:
        room -= layers * per_probe
    per_layer = 2 if score_alone else 1
    fits = int((room / total - 2) // per_layer) if room > 0 else 0
    return ProbePlan(score_alone, max(0, min(most_rescored, fits)))


def probe_subset(total: int | None, seed: int) -> np.ndarray | None:
    """The probes' fixed subset of the evaluation images (None: score every image; too few to split)."""
    if total is None or total < 2 * PROBE_SUBSET_MIN:
        return None
    from sensisearch.study.trial._fidelity import subset_positions

    return subset_positions(total, max(PROBE_SUBSET_MIN, int(round(total * PROBE_SUBSET_FRACTION))), seed)


def close_to_cut(scores: Mapping[str, float], ks: Sequence[int], margin: float) -> list[str]:
    """Layers whose score is within ``margin`` of a cut the seeds make (the k-th highest score, for each k in
    ``ks``): the decisions the subset might get wrong. Closest first."""
    ordered = sorted(scores.values(), reverse=True)
    distance: dict[str, float] = {}
    for k in ks:
        if not 0 < k < len(ordered):
            continue
        # The cut sits between rank k and rank k + 1: both sides of it are in question.
        cut = (ordered[k - 1] + ordered[k]) / 2
        for name, value in scores.items():
            gap = abs(value - cut)
            if gap <= max(margin, CLOSE_FRACTION * abs(cut)):
                distance[name] = min(distance.get(name, gap), gap)
    return sorted(distance, key=distance.__getitem__)


def measure_sensitivity(
    inputs: SensitivityInputs, on_probe: Callable[[str, float], None] | None = None
) -> SensitivityProfile:
    """Run every probe (2 per layer, plus FP32 and all-INT8 per calibration algorithm).

    Multi-fidelity: every probe scores a fixed subset of the evaluation images
    (:func:`probe_subset`); only the layers whose subset score is close to the
    ranking's decision (:func:`close_to_cut`) are scored again on every image, with
    FP32 and all-INT8 on every image to compare them with. Within a study the probes
    keep to their share of its budget (:func:`probe_plan`). The calibration
    statistics are the study's own (one statistics pass for probes and trials).
    """
    import time

    from sensisearch.errors import SensisearchError
    from sensisearch.study.trial._isolation import TrialProcessError

    space, pipeline = inputs.space, inputs.pipeline
    if Precision.INT8 not in space.precisions or inputs.calibration is None:
        raise SensisearchError("sensitivity needs INT8 in --precisions and calibration data (--calib-data DIR)")
    work = inputs.out / "sensitivity-work"
    timing_dir = inputs.out / "sensitivity-all-int8"  # beside ``work``, which each probe empties
    layers = list(space.layers)
    samples = space.default_calibration.samples
    total = pipeline.evaluator.image_count()
    subset = probe_subset(total, int(inputs.key.get("seed", 0) or 0))
    plan = probe_plan(len(layers), len(space.algorithms), len(subset) if subset is not None else (total or 0), total,
                      inputs.budget, subset is not None)
    if not plan.score_alone:
        log.info("sensitivity: only-this-layer-INT8 probes by output distortion (their metric would pass the probes' "
                 "%.0f%% of --budget %s)", 100 * PROBE_BUDGET_SHARE, inputs.budget)
    planned = 1 + len(space.algorithms) + 2 * len(layers)
    started = time.perf_counter()
    done = {"probes": 0, "images": 0}

    feeds = _probe_feeds(inputs)
    # Probes can take many minutes on a large model: a log gets a line with the ETA every half minute.
    progress = PhaseProgress("sensitivity probes", "probes")
    progress.start(f"{planned} probes planned")
    reference: list[np.ndarray] = []
    subset_count: list[int] = []

    failed: list[str] = []
    # Where trials are timed here (not predicted): the all-INT8 build every all-but-this-layer probe is timed against.
    timed_against: Path | None = None

    def score(
        name: str, config: TrialConfig, full: bool = False, metric: bool = True, time_it: bool = False,
    ) -> tuple[float | None, float, tuple[float, float, float] | None]:
        positions = None if full or subset is None else subset
        speedup = None
        try:
            value, count, outputs, speedup = score_probe(
                inputs, config, work, feeds, positions, metric, timed_against=timed_against if time_it else None)
        except TrialProcessError as exc:
            if not reference:  # the FP32 probe: nothing to rank against
                raise SensisearchError(f"sensitivity: the FP32 model failed to build or run: {exc}") from None
            # A configuration that does not build or run delivers nothing: the worst score, and the
            # ranking keeps the layers that cause it in float. The study's trials meet it as failed trials.
            log.warning("sensitivity probe %s failed, scored %s 0: %s", name, pipeline.evaluator.metric, exc)
            failed.append(f"{name}: {exc}")
            value, count, outputs = (0.0 if metric else None), 0, []
        done["probes"] += 1
        # Evaluation images are the cost (as a trial's); the probe batch every probe runs for its output
        # distortion is one batch, no scoring, and counts in neither kind of probe.
        done["images"] += count
        if positions is not None and not subset_count and count:
            subset_count.append(count)
        distortion = output_distortion(outputs, reference) if reference and outputs else 0.0
        elapsed = time.perf_counter() - started
        eta = elapsed / done["probes"] * max(planned - done["probes"], 0)
        log.info("probe %d/%d %s (%s images): %s %s, output distortion %.3g%s; %.0f s so far, ETA %.0f s",
                 done["probes"], planned, name, count, pipeline.evaluator.metric,
                 "not scored" if value is None else f"{value:.3f}", distortion,
                 "" if speedup is None else ", speed-up {:.3f}x [{:.3f}, {:.3f}]".format(*speedup), elapsed, eta)
        if on_probe is not None and value is not None:
            on_probe(name, value)
        progress.step(done["probes"], planned)
        if not reference:
            reference.extend(outputs)
        return value, distortion, speedup

    # A clip the search space offers, so seeds built on this choice can be enqueued.
    percentile = space.default_calibration.percentile
    if space.percentiles and percentile not in space.percentiles:
        percentile = space.percentiles[len(space.percentiles) // 2]
    if inputs.isolation is not None:
        # Thresholds are cached in this process: computed once here, before the forked probes, instead of in each child.
        for algorithm in space.algorithms:
            pipeline.ranges_for(TrialConfig.uniform(layers, Precision.INT8, CalibrationChoice(algorithm, samples, percentile)), every_tensor=True)
    fp32 = _scored(score("fp32", TrialConfig.uniform(layers, Precision.FP32))[0])
    # The calibration the probes use: the best all-INT8 one on the subset (one
    # choice per algorithm; percentile at the default clip).
    calibration_scores: dict[str, float] = {}
    best: tuple[float, CalibrationChoice] | None = None
    for algorithm in space.algorithms:
        choice = CalibrationChoice(algorithm, samples, percentile)
        value = _scored(score(f"all-int8 {_label(choice)}", TrialConfig.uniform(layers, Precision.INT8, choice))[0])
        calibration_scores[_label(choice)] = value
        if best is None or value > best[0]:
            best = (value, choice)
    assert best is not None
    all_int8, choice = best
    if pipeline.timed_here:
        timed_against = _kept_build(inputs, TrialConfig.uniform(layers, Precision.INT8, choice), timing_dir)

    def configs(layer: str) -> tuple[TrialConfig, TrialConfig]:
        only = {name: (Precision.INT8 if name == layer else Precision.FP32) for name in layers}
        but = {name: (Precision.FP32 if name == layer else Precision.INT8) for name in layers}
        return TrialConfig(only, choice), TrialConfig(but, choice)

    probes: dict[str, LayerProbe] = {}
    for layer in layers:
        only, but = configs(layer)
        only_int8, distortion, _ = score(f"only {layer}", only, metric=plan.score_alone)
        all_but, _, speedup = score(f"all but {layer}", but, time_it=True)
        probes[layer] = LayerProbe(layer, only_int8=only_int8, all_but=_scored(all_but), distortion=distortion,
                                   revert_speedup=speedup)
    count = subset_count[0] if subset_count else 0
    rescored: list[str] = []
    if subset is not None:
        resolution = 100.0 / max(count, 1) if inputs.classification else 0.0
        scores = {n: (0.0 if p.only_int8 is None else fp32 - p.only_int8) + (p.all_but - all_int8) for n, p in probes.items()}
        # The seeds' cuts (all-INT8 minus the top 1, 2, 3, 5, 8); two full evaluations per rescored
        # layer, so a small model affords fewer of them.
        # The ranking decides which layers the seeds keep in float: a layer near one of those cuts is rescored.
        from sensisearch.study.search._seeds import SEED_KS

        ks = [k for k in SEED_KS if k < len(layers)]
        rescored = close_to_cut(scores, ks, resolution)[:plan.rescored]
        planned += (2 + (2 if plan.score_alone else 1) * len(rescored)) if rescored else 0
        log.info("sensitivity: %d of %d layers are close to the seeds' cuts (top %s) on the %d-image subset: scored on every image",
                 len(rescored), len(layers), ks, count)
        if rescored:
            full_fp32 = _scored(score("fp32 (every image)", TrialConfig.uniform(layers, Precision.FP32), full=True)[0])
            full_int8 = _scored(score(f"all-int8 {_label(choice)} (every image)",
                                      TrialConfig.uniform(layers, Precision.INT8, choice), full=True)[0])
            for layer in rescored:
                only, but = configs(layer)
                all_but = _scored(score(f"all but {layer} (every image)", but, full=True)[0])
                # On the subset's scale, so full-image and subset scores rank together.
                alone = probes[layer].only_int8
                if plan.score_alone:
                    alone = fp32 - (full_fp32 - _scored(score(f"only {layer} (every image)", only, full=True)[0]))
                probes[layer] = dataclasses.replace(probes[layer], only_int8=alone, all_but=all_int8 + (all_but - full_int8))
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(timing_dir, ignore_errors=True)
    progress.end()
    seconds = time.perf_counter() - started
    eval_total = total if total is not None else max(count, 1)
    return SensitivityProfile(
        key=dict(inputs.key),
        metric=pipeline.evaluator.metric,
        calibration=choice.to_dict(),
        fp32=fp32,
        all_int8=all_int8,
        # A classifier's metric moves in steps of one image; mAP is continuous.
        layers=rank_layers(list(probes.values()), fp32, all_int8,
                           resolution=100.0 / max(count or eval_total, 1) if inputs.classification else 0.0),
        tensors=tensor_sensitivity(inputs, samples),
        calibration_scores=calibration_scores,
        eval_count=count or eval_total,
        probes=done["probes"],
        cost_trials=done["images"] / max(eval_total, 1),
        seconds=seconds,
        rescored=rescored,
        failed=failed,
    )


def _kept_build(inputs: SensitivityInputs, config: TrialConfig, folder: Path) -> Path | None:
    """``config`` emitted and built into ``folder`` (kept for timing against), in a forked child under isolation
    as a probe is; None when it fails (a warning: the probes then go untimed)."""
    from sensisearch.study.trial._isolation import TrialProcessError, run_forked

    pipeline = inputs.pipeline

    def built() -> Path:
        deployable, _ = pipeline.emit(config, folder)
        return pipeline.build(deployable, folder, config).artifact

    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(folder.name + "-hand-off")
    try:
        if inputs.isolation is None:
            return built()
        run_forked(lambda hand_off: (hand_off / "artifact.txt").write_text(str(built())), scratch,
                   inputs.isolation.build_timeout, "all-INT8 build for the probes' timing")
        return Path((scratch / "artifact.txt").read_text())
    except (TrialProcessError, OSError) as exc:
        log.warning("sensitivity: the all-INT8 build to time the probes against failed, probes not timed: %s", exc)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scored(value: float | None) -> float:
    """A metric probe's value (never None: only outputs-only probes have none)."""
    assert value is not None
    return value


def load_cached(path: Path, key: Mapping[str, Any]) -> SensitivityProfile | None:
    """The profile in ``path`` if it was measured under ``key``, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        profile = SensitivityProfile.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s), measuring again", path, exc)
        return None
    if json.loads(json.dumps(dict(key))) != profile.key:
        log.info("%s was measured under other settings, measuring again", path)
        return None
    return profile


def sensitivity_profile(
    inputs: SensitivityInputs,
    study: optuna.Study | None = None,
    refresh: bool = False,
    on_probe: Callable[[str, float], None] | None = None,
) -> tuple[SensitivityProfile, bool]:
    """The cached profile or a new measurement; returns (profile, came from cache).

    Written to ``<out>/sensitivity.json`` and, when ``study`` is given, stored as
    its ``sensitivity`` user attribute too (so every worker of a shared storage sees it).
    """
    path = inputs.out / SENSITIVITY_FILE
    cached = None if refresh else load_cached(path, inputs.key)
    if cached is not None:
        profile, from_cache = cached, True
    else:
        profile, from_cache = measure_sensitivity(inputs, on_probe), False
        write_json_atomic(path, profile.to_dict())
    if study is not None and study.user_attrs.get(STUDY_ATTR, {}).get("key") != profile.to_dict()["key"]:
        study.set_user_attr(STUDY_ATTR, profile.to_dict())
    return profile, from_cache

