"""The study uses its sensitivity profile: the groups or compact space, and the seeds enqueued once per study."""

from __future__ import annotations

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
    uses_sensitivity,
)
from sensisearch.study.search._sensitivity import sensitivity_profile
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
    profile, cached = sensitivity_profile(ctx.sensitivity_inputs())
    log.info("sensitivity profile %s; most sensitive: %s", "from cache" if cached else "measured", profile.ranking[:5])
    if ctx.settings.search.search == "topk":
        ctx.space = compact_space(ctx.space, profile.ranking, ctx.settings.search.top_k)
    return ctx


def enqueue_seeds(ctx: StudyContext, study: optuna.Study) -> list[str]:
    """Enqueue the sensitivity seeds once per study (a resumed run or another worker does not repeat them).

    Returns the names enqueued now (empty when they were already, or the sampler is not ``seeded``).
    """
    if ctx.settings.search.sampler != "seeded" or SEEDS_ENQUEUED_ATTR in study.user_attrs:
        return []
    profile, _ = sensitivity_profile(ctx.sensitivity_inputs(), study)
    float_precision = Precision.FP16 if Precision.FP16 in ctx.space.precisions else Precision.FP32
    seeds = seed_configs(
        ctx.space.layers, profile.ranking, profile.calibration_choice,
        head_rule_layers(ctx.model, ctx.info, ctx.pipeline.index), float_precision=float_precision,
        groups=ctx.space.groups,
    )
    names = []
    for name, config in seeds:
        if not ctx.space.expresses(config):
            log.info("seed %s: outside the search space (compact or groups), skipped", name)
            continue
        # skip_if_exists: two workers racing here still queue each configuration once.
        study.enqueue_trial(ctx.space.params_for(config), user_attrs=TrialRecord(0, seed=name).to_attrs(), skip_if_exists=True)
        names.append(name)
    study.set_user_attr(SEEDS_ENQUEUED_ATTR, names)
    return names
