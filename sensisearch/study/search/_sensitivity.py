"""Which layers matter: per-layer INT8 sensitivity and per-tensor calibration sensitivity.

Two probes per quantizable layer, both scored by the study's evaluator (on a fast
evaluation subset) through the study's own :class:`~sensisearch.artifact.ArtifactPipeline`,
so a probe is exactly the deployable graph a trial would build:

* **only this layer INT8** (the rest FP32): the damage the layer does on its own;
* **all INT8 except this layer** (it stays FP32): how much keeping it in float
  recovers from all-INT8, i.e. the damage it does in context.

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

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from sensisearch.calibration.spread import DEFAULT_SPREAD_PERCENTILES, threshold_spread
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig

if TYPE_CHECKING:
    import optuna

    from sensisearch.evaluation.base import EvaluationResult
    from sensisearch.study.run._context import StudyContext
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


# --------------------------------------------------------------------------- pure ranking
@dataclass(frozen=True)
class LayerProbe:
    """Metric (points) of the two probes of one layer."""

    layer: str
    only_int8: float
    """Only this layer INT8, every other layer FP32."""
    all_but: float
    """Every layer INT8 except this one (FP32)."""
    distortion: float = 0.0
    """Relative squared error of the model outputs vs FP32 with only this layer INT8,
    on a fixed probe batch: a continuous signal where the metric moves by less
    than its resolution (one sample)."""


@dataclass(frozen=True)
class LayerSensitivity:
    """One ranked row: drops are in points of the metric, positive = INT8 hurts."""

    layer: str
    rank: int
    """1 = most sensitive."""
    alone_drop: float
    """FP32 metric minus the only-this-layer-INT8 metric."""
    recovery: float
    """All-but-this-layer metric minus the all-INT8 metric."""
    score: float
    """``alone_drop + recovery``: the damage in isolation plus the damage in context."""
    distortion: float = 0.0
    """:attr:`LayerProbe.distortion`."""


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
    flip. Remaining ties keep the probes' order (graph order).
    """
    scored = []
    for order, probe in enumerate(probes):
        alone = fp32 - probe.only_int8
        recovery = probe.all_but - all_int8
        score = alone + recovery
        # An apparent gain from INT8 (negative score) is noise at this scale.
        measurable = score if score > 2 * resolution else 0.0
        scored.append((-measurable, -probe.distortion, order, probe, alone, recovery))
    scored.sort(key=lambda row: row[:3])
    return [
        LayerSensitivity(
            layer=probe.layer, rank=i + 1, alone_drop=alone, recovery=recovery, score=alone + recovery,
            distortion=probe.distortion,
        )
        for i, (_, _, _, probe, alone, recovery) in enumerate(scored)
    ]


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
            layers=[LayerSensitivity(**r) for r in data["layers"]],
            tensors=[TensorSensitivity(**t) for t in data.get("tensors", [])],
            calibration_scores={k: float(v) for k, v in data.get("calibration_scores", {}).items()},
            eval_count=int(data.get("eval_count", 0)),
        )


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
) -> tuple[EvaluationResult, list[np.ndarray]]:
    """Accuracy only: emit, build, load and evaluate ``config`` (no latency), then delete the files.

    The same emit/build path as a study trial, so the score is that of exactly
    the deployable graph the profile produces. Also returns the outputs on
    ``probe_feeds`` (empty without them).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        deployable, _ = pipeline.emit(config, work_dir)
        build = pipeline.build(deployable, work_dir, config)
        with pipeline.backend.load(build.artifact) as runner:
            outputs = [] if probe_feeds is None else runner.run(probe_feeds)
            return pipeline.evaluator.evaluate(runner), outputs
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _probe_feeds(ctx: StudyContext) -> Mapping[str, np.ndarray]:
    # A static-batch model (YOLOv5 exports) only takes its own batch size.
    batch = ctx.info.inputs[0].shape[0] if ctx.info.inputs and ctx.info.inputs[0].shape else None
    try:
        return ctx.evaluator.latency_feeds(PROBE_BATCH if batch is None else int(batch))
    except Exception:  # an evaluator that cannot give that batch: its latency batch then
        return ctx.evaluator.latency_feeds(ctx.settings.backend.latency_batch)


def tensor_sensitivity(
    ctx: StudyContext, samples: int, percentiles: Sequence[float] = DEFAULT_SPREAD_PERCENTILES
) -> list[TensorSensitivity]:
    """Per tensor any profile may quantize: its amax under each algorithm at ``samples`` calibration samples."""
    from sensisearch.quantize.placement import statistics_tensors

    if ctx.calibration is None:
        return []
    table = ctx.calibration.table
    resolved = table.resolve_samples(samples)
    names = statistics_tensors(ctx.model, ctx.info, ctx.pipeline.index)
    stats = {name: table.statistics(name, resolved) for name in names}
    rows = []
    for t in threshold_spread(stats, ctx.space.algorithms, percentiles):
        label, ratio = t.strongest_clipping
        rows.append(TensorSensitivity(t.tensor, dict(t.amax), label, ratio, ratio < NEEDS_CLIPPING_BELOW))
    return rows


def profile_key(ctx: StudyContext) -> dict[str, Any]:
    """What the probe scores depend on: a cached profile is reused only when all of it matches."""
    settings = ctx.settings
    calib = ctx.evaluation.calibration
    return {
        "model_sha256": ctx.info.sha256,
        "eval_data": str(settings.data.eval_data) if settings.data.eval_data else settings.data.example,
        "annotations": str(settings.data.annotations) if settings.data.annotations else None,
        "eval_limit": settings.data.eval_limit,
        "calib_data": None if calib is None else calib.fingerprint,
        "seed": settings.search.seed,
        "metric": ctx.evaluator.metric,
        "profile": ctx.backend.profile.name,
        "algorithms": [a.value for a in ctx.space.algorithms],
        "samples": ctx.space.default_calibration.samples,
    }


def _label(choice: CalibrationChoice) -> str:
    from sensisearch.calibration.spread import calibration_label

    return calibration_label(choice.algorithm, choice.percentile)


def measure_sensitivity(
    ctx: StudyContext, on_probe: Callable[[str, float], None] | None = None
) -> SensitivityProfile:
    """Run every probe (2 per layer, plus FP32 and all-INT8 per calibration algorithm)."""
    if Precision.INT8 not in ctx.space.precisions or ctx.calibration is None:
        from sensisearch.errors import SensisearchError

        raise SensisearchError("sensitivity needs INT8 in --precisions and calibration data (--calib-data DIR)")
    work = ctx.out / "sensitivity-work"
    layers = list(ctx.space.layers)
    samples = ctx.space.default_calibration.samples

    counts: list[int] = []
    feeds = _probe_feeds(ctx)
    reference: list[np.ndarray] = []

    def score(name: str, config: TrialConfig) -> tuple[float, float]:
        result, outputs = score_config(ctx.pipeline, config, work, feeds)
        counts.append(result.count)
        distortion = output_distortion(outputs, reference) if reference else 0.0
        log.info("probe %s: %s %.3f, output distortion %.3g", name, ctx.evaluator.metric, result.value, distortion)
        if on_probe is not None:
            on_probe(name, result.value)
        if not reference:
            reference.extend(outputs)
        return result.value, distortion

    fp32, _ = score("fp32", TrialConfig.uniform(layers, Precision.FP32))
    # The calibration the probes use: the best all-INT8 one on the subset (one
    # choice per algorithm; percentile at the default clip).
    calibration_scores: dict[str, float] = {}
    best: tuple[float, CalibrationChoice] | None = None
    # A clip the search space offers, so seeds built on this choice can be enqueued.
    percentile = ctx.space.default_calibration.percentile
    if ctx.space.percentiles and percentile not in ctx.space.percentiles:
        percentile = ctx.space.percentiles[len(ctx.space.percentiles) // 2]
    for algorithm in ctx.space.algorithms:
        choice = CalibrationChoice(algorithm, samples, percentile)
        value, _ = score(f"all-int8 {_label(choice)}", TrialConfig.uniform(layers, Precision.INT8, choice))
        calibration_scores[_label(choice)] = value
        if best is None or value > best[0]:
            best = (value, choice)
    assert best is not None
    all_int8, choice = best
    probes = []
    for layer in layers:
        only = {name: (Precision.INT8 if name == layer else Precision.FP32) for name in layers}
        but = {name: (Precision.FP32 if name == layer else Precision.INT8) for name in layers}
        only_int8, distortion = score(f"only {layer}", TrialConfig(only, choice))
        all_but, _ = score(f"all but {layer}", TrialConfig(but, choice))
        probes.append(LayerProbe(layer, only_int8=only_int8, all_but=all_but, distortion=distortion))
    shutil.rmtree(work, ignore_errors=True)
    return SensitivityProfile(
        key=profile_key(ctx),
        metric=ctx.evaluator.metric,
        calibration=choice.to_dict(),
        fp32=fp32,
        all_int8=all_int8,
        # A classifier's metric moves in steps of one image; mAP is continuous.
        layers=rank_layers(probes, fp32, all_int8, resolution=100.0 / max(counts[0], 1) if ctx.task == "classification" else 0.0),
        tensors=tensor_sensitivity(ctx, samples),
        calibration_scores=calibration_scores,
        eval_count=counts[0],
    )


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
    ctx: StudyContext,
    study: optuna.Study | None = None,
    refresh: bool = False,
    on_probe: Callable[[str, float], None] | None = None,
) -> tuple[SensitivityProfile, bool]:
    """The cached profile or a new measurement; returns (profile, came from cache).

    Written to ``<out>/sensitivity.json`` and, when ``study`` is given, stored as
    its ``sensitivity`` user attribute too (so every worker of a shared storage sees it).
    """
    path = ctx.out / SENSITIVITY_FILE
    key = profile_key(ctx)
    cached = None if refresh else load_cached(path, key)
    if cached is not None:
        profile, from_cache = cached, True
    else:
        profile, from_cache = measure_sensitivity(ctx, on_probe), False
        write_json_atomic(path, profile.to_dict())
    if study is not None and study.user_attrs.get(STUDY_ATTR, {}).get("key") != profile.to_dict()["key"]:
        study.set_user_attr(STUDY_ATTR, profile.to_dict())
    return profile, from_cache

