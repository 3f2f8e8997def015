"""The study uses the sensitivity profile: seeds, a compact space, the sampler choice, the profile override.

60 independent binary choices are the weakest way to search a YOLO's precision
space: a random or TPE proposal keeps ~half the layers in float and never gets
near all-INT8-but-a-few. The profile says which few layers matter, so the study
starts from the configurations practitioners build by hand (all-INT8 minus the
top-k sensitive layers; "first conv + Detect head in float") and, with
``--search topk``, only searches the top-k layers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Collection, Sequence

import optuna

from sensisearch.errors import SensisearchError
from sensisearch.quantize.config import CalibrationChoice, Precision, TrialConfig
from sensisearch.quantize.graph import GraphIndex, activation_epilogue, feeds_layers
from sensisearch.study.config._settings import SAMPLERS
from sensisearch.study.search._budget import TrialSeededSampler
from sensisearch.study.search._guided import GuidedPlan, GuidedSampler

if TYPE_CHECKING:
    import onnx

    from sensisearch.model.analysis import ModelInfo
    from sensisearch.study.config._settings import StudySettings
    from sensisearch.study.search._space import SearchSpace

log = logging.getLogger(__name__)

SEED_KS = (1, 2, 3, 5, 8)
"""All-INT8 minus the top-k sensitive layers, for each k."""
SEEDS_ENQUEUED_ATTR = "sensitivity_seeds"
"""Study user attribute: the seed names once they were enqueued (never again on resume)."""
HEAD_RULE = "first conv + head float"


def make_sampler(name: str, seed: int, plan: GuidedPlan | None = None) -> optuna.samplers.BaseSampler:
    """The study's sampler; ``seeded`` is TPE whose first trials are the sensitivity seeds; ``guided`` needs its ``plan``."""
    if name == "guided":
        if plan is None:
            raise SensisearchError("--sampler guided: needs the sensitivity profile (INT8 in --precisions and --calib-data)")
        return GuidedSampler(plan, seed)
    # Seeded per trial number (TrialSeededSampler): a resumed study or a second worker continues
    # the sampler instead of replaying the first run's proposals.
    if name in ("tpe", "seeded"):
        return TrialSeededSampler(seed, constant_liar=True)
    if name == "random":
        return TrialSeededSampler(seed, lambda s: optuna.samplers.RandomSampler(seed=s))
    if name == "nsga2":
        return TrialSeededSampler(seed, lambda s: optuna.samplers.NSGAIISampler(seed=s))
    raise SensisearchError(f"--sampler {name}: use one of {', '.join(SAMPLERS)}")


def uses_sensitivity(settings: StudySettings) -> bool:
    return settings.search.sampler in ("seeded", "guided") or settings.search.search == "topk"


def head_rule_layers(model: onnx.ModelProto, info: ModelInfo, index: GraphIndex | None = None) -> list[str]:
    """The first layer plus the "head": layers whose output (after its activation) leads to no layer, only to graph outputs."""
    index = index or GraphIndex(model)
    to_layers = feeds_layers(index, info.layers)
    head = []
    for layer in info.layers:
        epilogue = activation_epilogue(index, layer.output)
        outputs = {layer.output} | ({epilogue.output} if epilogue else set())
        if not outputs & to_layers:
            head.append(layer.name)
    first = [info.layers[0].name] if info.layers else []
    return list(dict.fromkeys(first + head))


def rank_groups(groups: Sequence[Sequence[str]], ranking: Sequence[str]) -> list[tuple[str, ...]]:
    """``groups`` ordered by their most sensitive member's rank in ``ranking`` (unranked members last)."""
    position = {name: i for i, name in enumerate(ranking)}
    return sorted((tuple(g) for g in groups), key=lambda g: min(position.get(n, len(position)) for n in g))


def close_over_groups(layers: Sequence[str], groups: Sequence[Sequence[str]] | None) -> list[str]:
    """``layers`` plus every other member of their groups (a seed the groups space can express)."""
    if groups is None:
        return list(layers)
    wanted = set(layers)
    return [n for g in groups if wanted & set(g) for n in g]


def seed_configs(
    layers: Sequence[str],
    ranking: Sequence[str],
    calibration: CalibrationChoice,
    head_rule: Sequence[str] = (),
    ks: Sequence[int] = SEED_KS,
    float_precision: Precision = Precision.FP32,
    groups: Sequence[Sequence[str]] | None = None,
) -> list[tuple[str, TrialConfig]]:
    """Named seed configurations: all-INT8 minus the top-k of ``ranking`` (k in ``ks``, at most all but one), then the head rule.

    With ``groups`` (``--search groups``) the units are groups ranked by their most
    sensitive member (:func:`rank_groups`): all-INT8 minus the top-k *groups*, and the
    head rule closed over its groups. Duplicates (the same float set twice) are
    dropped; the order is the enqueue order.
    """
    seeds: list[tuple[str, TrialConfig]] = []
    seen: set[frozenset[str]] = set()
    units = [(n,) for n in ranking] if groups is None else rank_groups(groups, ranking)
    unit = "" if groups is None else " groups"

    def add(name: str, floats: Sequence[str]) -> None:
        key = frozenset(floats)
        if not key or key in seen or len(key) >= len(layers):
            return
        seen.add(key)
        seeds.append((name, TrialConfig({n: float_precision if n in key else Precision.INT8 for n in layers}, calibration)))

    for k in ks:
        add(f"int8 minus top-{k}{unit}", [n for u in units[:k] for n in u])
    add(HEAD_RULE, close_over_groups(head_rule, groups))
    return seeds


def compact_space(space: SearchSpace, ranking: Sequence[str], k: int) -> SearchSpace:
    """Only the ``k`` most sensitive layers free; the rest INT8."""
    return dataclasses.replace(space, free_layers=tuple(ranking[:k]), fixed_precision=Precision.INT8)


def split_faster_in_float(groups: Sequence[Sequence[str]], faster: Collection[str]) -> tuple[tuple[str, ...], ...]:
    """``groups`` with each layer of ``faster`` (measured faster in float on its own) made a group of its own.

    A fusion group says that mixing precisions inside it costs more than its INT8 layers
    gain: a rule of thumb about the backend, which a measurement overrides. On the MNIST
    CNN (ONNX Runtime CPU) the first conv shares a group with the residual conv it feeds;
    the first conv alone in float ran 1.13x faster than all-INT8, the two together in
    float 0.69x, so over the groups the fastest configuration could not be expressed.
    """
    out: list[tuple[str, ...]] = []
    for group in groups:
        rest = tuple(n for n in group if n not in faster)
        if rest:
            out.append(rest)
        out += [(n,) for n in group if n in faster]
    return tuple(out)


def groups_space(space: SearchSpace, groups: Sequence[Sequence[str]]) -> SearchSpace:
    """One parameter per fusion group (``--search groups``); every layer free through its group."""
    return dataclasses.replace(space, groups=tuple(tuple(g) for g in groups), free_layers=None)
