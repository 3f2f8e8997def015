"""What a study tries: the search space, the sensitivity profile, seeds, samplers and the budget."""

from sensisearch.study.search._budget import PROBE_COST_ATTR
from sensisearch.study.search._guided import PHASE_ATTR, GuidedPlan, GuidedSampler, find_boundary
from sensisearch.study.search._seeds import compact_space, groups_space, head_rule_layers, make_sampler, rank_groups, seed_configs
from sensisearch.study.search._sensitivity import SensitivityProfile, score_config, sensitivity_profile
from sensisearch.study.search._space import SearchSpace

__all__ = [
    "PHASE_ATTR",
    "PROBE_COST_ATTR",
    "GuidedPlan",
    "GuidedSampler",
    "find_boundary",
    "rank_groups",
    "SearchSpace",
    "SensitivityProfile",
    "compact_space",
    "groups_space",
    "head_rule_layers",
    "make_sampler",
    "score_config",
    "seed_configs",
    "sensitivity_profile",
]
