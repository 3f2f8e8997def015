"""`run` with no search flags runs the guided study, and its sensitivity probes take their share of --budget."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from sensisearch.quantize.config import CalibrationAlgorithm
from sensisearch.study import StudySettings, finished_count, prepare, run_study
from sensisearch.study.search._budget import PROBE_COST_ATTR
from sensisearch.study.search._guided import PHASE_ATTR
from sensisearch.study.store._worker import SETTINGS_ATTR


@pytest.mark.slow
def test_default_run_is_the_guided_study_and_its_probes_count_in_the_budget(tmp_path: Path) -> None:
    budget = 24
    ctx = prepare(StudySettings.from_flat(
        example="digits", out=tmp_path, budget=budget, eval_limit=200, sample_counts=[128], backend="onnxruntime",
        algorithms=[CalibrationAlgorithm.MINMAX], latency_seconds=0.05, verify=False, isolation="none", max_drop=0.5,
    ))
    assert (ctx.settings.search.sampler, ctx.settings.search.search) == ("guided", "groups")
    assert ctx.space.groups is not None
    study = run_study(ctx)

    cost = study.user_attrs[PROBE_COST_ATTR]
    assert cost["probes"] > 0 and 0 < cost["trials"] < cost["probes"]  # subset probes cost a fraction of a trial each
    assert finished_count(study) == budget - math.ceil(cost["trials"])
    assert study.user_attrs[SETTINGS_ATTR]["search"]["sampler"] == "guided"  # stored explicitly: a resume keeps it
    phases = [t.system_attrs.get(PHASE_ATTR) for t in study.get_trials(deepcopy=False)]
    # After the seeds every proposal is a guided one (digits' all-INT8 is already within 0.5 points, so its boundary is
    # k = 0 and the walk goes straight to the sampler and the local search; the bisection has its own test).
    assert {p for p in phases if p is not None} <= {"boundary", "greedy", "speed", "sampler", "local"}
    assert "local" in phases
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= finished_count(study)
