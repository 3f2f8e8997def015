"""The study uses its sensitivity profile: the groups or compact space, and the seeds enqueued once per study."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from sensisearch.quantize import fusion_groups
from sensisearch.quantize.config import Precision
from sensisearch.study.search._seeds import (
    SEEDS_ENQUEUED_ATTR,
    compact_space,
    groups_space,
    head_rule_layers,
    seed_configs,
    split_faster_in_float,
    uses_sensitivity,
)
from sensisearch.quantize.config import CalibrationChoice, TrialConfig
from sensisearch.study.search._budget import PROBE_COST_ATTR, searched_budget
from sensisearch.study.search._guided import GuidedPlan, faster_units, predicted_faster_units
from sensisearch.study.search._seeds import rank_groups
from sensisearch.study.search._sensitivity import SENSITIVITY_FILE, SensitivityProfile, load_cached, sensitivity_profile
from sensisearch.study.store._record import TrialRecord

if TYPE_CHECKING:
    import optuna

    from sensisearch.study.run._context import StudyContext

log = logging.getLogger(__name__)


def apply_sensitivity(ctx: StudyContext) -> StudyContext:
    """The groups space for ``--search groups``; measure (or load) the sensitivity profile when the search uses it; the compact space for ``--search topk``."""
    if ctx.settings.search.search == "groups":
        groups = fusion_groups(ctx.pipeline.index, ctx.info.layers, ctx.backend.profile)
        log.info("--search groups: %d layers in %d fusion groups (profile %s)", len(ctx.info.layers), len(groups), ctx.backend.profile.name)
        ctx.space = groups_space(ctx.space, groups)
    if not uses_sensitivity(ctx.settings):
        return ctx
    if ctx.identity_may_differ and load_cached(ctx.out / SENSITIVITY_FILE, ctx.sensitivity_key()) is None:
        # Reviewing (verify, report) runs no trial: never probes, even where the profile was not copied along.
        log.info("reviewing without the study's sensitivity profile: not measured again")
        return ctx
    profile, cached = sensitivity_profile(ctx.sensitivity_inputs())
    log.info("sensitivity profile %s; most sensitive: %s", "from cache" if cached else "measured", profile.ranking[:5])
    if ctx.space.groups is not None and profile.faster_in_float:
        split = split_faster_in_float(ctx.space.groups, profile.faster_in_float)
        if len(split) != len(ctx.space.groups):
            log.info("--search groups: %s measured faster in float on their own than in INT8: out of their fusion groups (%d groups)",
                     ", ".join(profile.faster_in_float), len(split))
            ctx.space = groups_space(ctx.space, split)
    if ctx.settings.search.search == "topk":
        ctx.space = compact_space(ctx.space, profile.ranking, ctx.settings.search.top_k)
    return ctx


def float_precision(ctx: StudyContext) -> Precision:
    """The precision a seed keeps its sensitive layers in: FP16 where the target offers it (faster than FP32, nearly as exact)."""
    return Precision.FP16 if Precision.FP16 in ctx.space.precisions else Precision.FP32


def guided_plan(ctx: StudyContext) -> GuidedPlan:
    """The guided sampler's plan: the fusion groups (or layers) ranked by the sensitivity profile."""
    profile, _ = sensitivity_profile(ctx.sensitivity_inputs())
    groups = ctx.space.groups if ctx.space.groups is not None else [(n,) for n in ctx.space.layers]
    units = rank_groups(groups, profile.ranking)
    precision = float_precision(ctx)
    # Which units run faster in float: the predictor's figure where trials are predicted, else the timed probes'.
    predictor = ctx.pipeline.predictor
    if predictor is not None:
        faster = predicted_faster_units(predictor, list(ctx.space.layers), units, precision)
    else:
        faster = faster_units(units, profile.faster_in_float)
    if faster:
        log.info("guided: %d of %d units are faster in float than in INT8: %s", len(faster), len(units),
                 ", ".join(units[i][0] for i in faster))
    return GuidedPlan(
        space=ctx.space, units=units, max_drop=ctx.settings.acceptance.max_drop,
        budget=lambda study: searched_budget(ctx.settings.search.budget, study.user_attrs), float_precision=precision,
        faster_in_float=faster,
    )


def calibration_seeds(ctx: StudyContext, profile: SensitivityProfile) -> list[tuple[str, CalibrationChoice]]:
    """The calibrations the guided seeds are tried under: every algorithm for all-INT8, the best two
    (all-INT8 on the probes' subset) for the ranking's seeds, so the sampler narrows calibration from evidence."""
    percentile = profile.calibration_choice.percentile
    samples = profile.calibration_choice.samples
    choices = [CalibrationChoice(a, samples, percentile) for a in ctx.space.algorithms]
    from sensisearch.calibration.spread import calibration_label

    scored = sorted(choices, key=lambda c: -profile.calibration_scores.get(calibration_label(c.algorithm, c.percentile), float("-inf")))
    return [(calibration_label(c.algorithm, c.percentile), c) for c in scored]


def enqueue_seeds(ctx: StudyContext, study: optuna.Study) -> list[str]:
    """Enqueue the sensitivity seeds once per study (a resumed run or another worker does not repeat them).

    Returns the names enqueued now (empty when they were already, or the sampler is neither ``seeded`` nor ``guided``).
    The probes' cost is recorded in the study (:data:`~sensisearch.study.search._budget.PROBE_COST_ATTR`): it counts in the budget.
    """
    if ctx.settings.search.sampler not in ("seeded", "guided") or SEEDS_ENQUEUED_ATTR in study.user_attrs:
        return []
    profile, _ = sensitivity_profile(ctx.sensitivity_inputs(), study)
    study.set_user_attr(PROBE_COST_ATTR, {"trials": profile.cost_trials, "seconds": profile.seconds, "probes": profile.probes})
    head = head_rule_layers(ctx.model, ctx.info, ctx.pipeline.index)
    seeds: list[tuple[str, TrialConfig]] = []
    if ctx.settings.search.sampler == "guided":
        ranked = calibration_seeds(ctx, profile)
        for label, choice in ranked:
            seeds.append((f"all-int8 {label}", TrialConfig.uniform(list(ctx.space.layers), Precision.INT8, choice)))
        if True in ctx.space.bias_correction:
            # Bias correction under the best calibrations; the walk takes the best all-INT8, so it stays only if it helps.
            for label, choice in ranked[:2]:
                corrected = dataclasses.replace(choice, bias_correction=True)
                seeds.append((f"all-int8 {label} + bias correction", TrialConfig.uniform(list(ctx.space.layers), Precision.INT8, corrected)))
        for label, choice in ranked[:2]:
            seeds += [(f"{name} ({label})", config) for name, config in seed_configs(
                ctx.space.layers, profile.ranking, choice, head, float_precision=float_precision(ctx), groups=ctx.space.groups)]
    else:
        seeds = seed_configs(
            ctx.space.layers, profile.ranking, profile.calibration_choice, head,
            float_precision=float_precision(ctx), groups=ctx.space.groups,
        )
    names = []
    # A configuration whose probe did not build or run would only fail again as a trial.
    failed_probes = {entry.split(": ", 1)[0] for entry in profile.failed}
    for name, config in seeds:
        if name.split(" + ", 1)[0] in failed_probes:
            log.info("seed %s: its probe failed to build or run, skipped", name)
            continue
        if not ctx.space.expresses(config):
            log.info("seed %s: outside the search space (compact or groups), skipped", name)
            continue
        # skip_if_exists: two workers racing here still queue each configuration once.
        study.enqueue_trial(ctx.space.params_for(config), user_attrs=TrialRecord(0, seed=name).to_attrs(), skip_if_exists=True)
        names.append(name)
    study.set_user_attr(SEEDS_ENQUEUED_ATTR, names)
    return names
