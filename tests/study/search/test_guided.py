"""The guided search: the boundary bisection against brute force, the greedy walk, the local search's neighbours."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sensisearch.quantize.config import CalibrationAlgorithm, Precision, TrialConfig
from sensisearch.study import StudySettings, prepare, score_config, sensitivity_profile
from sensisearch.study.config._settings import resolve_search
from sensisearch.study.search._guided import (
    Evaluated,
    boundary_k,
    boundary_next,
    find_boundary,
    greedy_next,
    local_next,
    pareto,
)
from sensisearch.study.search._seeds import rank_groups

if TYPE_CHECKING:
    import optuna

    from sensisearch.study.search._guided import GuidedPlan


def test_bisection_finds_the_first_feasible_k_of_a_monotone_curve() -> None:
    curve = [50.0, 52.0, 55.0, 58.0, 59.0, 59.5, 59.8, 60.0]  # metric of all-INT8 minus the top-k units
    for threshold in (51.0, 54.0, 58.5, 59.9):
        k, seen = find_boundary(lambda k: curve[k], len(curve) - 1, threshold)
        assert k == next(i for i, v in enumerate(curve) if v >= threshold)
        assert len(seen) <= 4  # log2(8) + the all-INT8 end, not all 8


def test_boundary_waits_for_a_pending_step_and_counts_all_float_as_feasible() -> None:
    assert boundary_next({0: 50.0, 4: None}, 8, 55.0) is None  # 4 pending: nothing to decide from yet
    assert boundary_k({0: 50.0}, 8, 55.0) == 8
    assert boundary_next({0: 56.0}, 8, 55.0) is None  # all-INT8 already feasible


def test_boundary_of_a_noisy_curve_is_its_smallest_feasible_k() -> None:
    # Seeds at k = 0, 2, 5, 8 (the k = 5 point fell below the bound by noise): the feasible k = 2 stands,
    # the bisection only asks k = 1 between it and the infeasible all-INT8.
    noisy = {0: 50.0, 2: 56.0, 5: 54.0, 8: 58.0}
    assert boundary_next(noisy, 20, 55.0) == 1
    assert boundary_k({**noisy, 1: 54.9}, 20, 55.0) == 2
    assert boundary_next({**noisy, 1: 54.9}, 20, 55.0) is None
    # All-INT8 within the bound: the boundary is k = 0 whatever failed above it.
    assert boundary_next({0: 55.5, 3: 54.0}, 20, 55.0) is None and boundary_k({0: 55.5, 3: 54.0}, 20, 55.0) == 0


def test_greedy_puts_back_least_sensitive_units_while_feasible() -> None:
    known = {frozenset({0, 1}): 58.0, frozenset({0}): 57.0}
    nxt, current = greedy_next(frozenset({0, 1, 2}), {frozenset({0, 1, 2}): 59.0}, 56.5)
    assert nxt == frozenset({0, 1}) and current == frozenset({0, 1, 2})
    known[frozenset({0, 1, 2})] = 59.0
    nxt, current = greedy_next(frozenset({0, 1, 2}), known, 56.5)
    assert current == frozenset({0}) and nxt is None or nxt == frozenset({0, 2})


def test_local_search_flips_one_unit_of_a_front_member() -> None:
    points = [Evaluated(frozenset({0}), 59.0, 2.0), Evaluated(frozenset(), 55.0, 1.0), Evaluated(frozenset({0, 1}), 58.0, 3.0)]
    front = pareto(points)
    assert {p.floats for p in front} == {frozenset({0}), frozenset()}
    # The fastest member (all-INT8) first, its most sensitive unit first: {0} is known, so {1}.
    assert local_next(front, {p.floats for p in points}, 3) == frozenset({1})
    # Its neighbours all known (all-float is FP32, never a neighbour): the next member's, {0} ^ {2}.
    known = {p.floats for p in points} | {frozenset({1}), frozenset({2})}
    assert local_next(front, known, 3) == frozenset({0, 2})


def _twenty_unit_study(algorithms: tuple[CalibrationAlgorithm, ...], **plan_options: Any) -> tuple[GuidedPlan, optuna.Study]:
    """(GuidedPlan, a real in-memory Optuna study under its GuidedSampler) over 20 single-layer groups, with FP32
    (50.0) and an all-INT8 within the 1-point bound (49.5) under min-max calibration already told."""
    import optuna

    from sensisearch.quantize.config import CalibrationChoice
    from sensisearch.study.search._guided import GuidedPlan, GuidedSampler
    from sensisearch.study.search._space import SearchSpace

    names = [f"conv{i}" for i in range(20)]
    choice = CalibrationChoice(CalibrationAlgorithm.MINMAX, 32, 99.99)
    space = SearchSpace(tuple(names), (Precision.INT8, Precision.FP32), algorithms, (32,), (99.99,), choice,
                        groups=tuple((n,) for n in names))
    plan = GuidedPlan(space, [(n,) for n in names], max_drop=1.0, budget=lambda study: 40, **plan_options)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=GuidedSampler(plan, seed=3))
    study.add_trial(optuna.trial.create_trial(
        params=plan.params(frozenset(range(20)), choice), distributions=plan.distributions, values=[50.0, 1.0],
        user_attrs={"baseline": "fp32", "role": "evaluate"}))
    study.add_trial(optuna.trial.create_trial(
        params=plan.params(frozenset(), choice), distributions=plan.distributions, values=[49.5, 0.5],
        user_attrs={"role": "evaluate"}))
    return plan, study


def test_the_sampler_phase_holds_the_least_sensitive_units_int8() -> None:
    """A real Optuna study: after FP32 and an all-INT8 within the bound (boundary k = 0), the sampler phase
    chooses only the 8 most sensitive of 20 groups; the 12 others come back INT8 in every proposal, and only the
    calibration whose all-INT8 is within the bound."""
    import optuna

    from sensisearch.quantize.config import CalibrationChoice
    from sensisearch.study.search._guided import SAMPLER_FREE_UNITS
    from sensisearch.study.search._space import ALGORITHM

    plan, study = _twenty_unit_study((CalibrationAlgorithm.MINMAX, CalibrationAlgorithm.ENTROPY))
    dists = plan.distributions
    entropy = CalibrationChoice(CalibrationAlgorithm.ENTROPY, 32, 99.99)  # all-INT8 under entropy: far outside the bound
    study.add_trial(optuna.trial.create_trial(
        params=plan.params(frozenset(), entropy), distributions=dists, values=[40.0, 0.5], user_attrs={"role": "evaluate"}))
    held = [plan.param(u) for u in plan.units[SAMPLER_FREE_UNITS:]]
    free = [plan.param(u) for u in plan.units[:SAMPLER_FREE_UNITS]]
    proposals = []
    for _ in range(12):
        trial = study.ask(dists)
        proposals.append(trial.params)
        study.tell(trial, [49.0, 0.7])
    assert all(p[name] == Precision.INT8.value for p in proposals for name in held)
    assert {p[ALGORITHM] for p in proposals} == {"minmax"}
    # The free units are really sampled: some proposal keeps one of them in float.
    assert any(p[name] != Precision.INT8.value for p in proposals for name in free)


def test_the_speed_walk_puts_faster_in_float_units_back_while_feasible() -> None:
    from sensisearch.study.search._guided import speed_next

    # Greedy answer {0}; units 5 and 2 are faster in float (5 the larger gain).
    start, faster = frozenset({0}), (5, 2)
    assert speed_next(start, faster, {start: 59.0}, 56.5) == (frozenset({0, 5}), start)
    # {0, 5} within the bound: kept, then 2 on top of it.
    assert speed_next(start, faster, {start: 59.0, frozenset({0, 5}): 57.0}, 56.5) == (frozenset({0, 2, 5}), frozenset({0, 5}))
    # {0, 5} below the bound: dropped, 2 tried on the greedy answer instead; a unit already float is skipped.
    assert speed_next(start, faster, {start: 59.0, frozenset({0, 5}): 56.0}, 56.5) == (frozenset({0, 2}), start)
    assert speed_next(start, (0, 5), {start: 59.0}, 56.5) == (frozenset({0, 5}), start)
    # Pending on another worker: nothing to propose from this walk yet.
    assert speed_next(start, faster, {start: 59.0, frozenset({0, 5}): None}, 56.5) == (None, start)
    assert speed_next(start, faster, {start: 59.0, frozenset({0, 5}): 57.0, frozenset({0, 2, 5}): 58.0}, 56.5) == (
        None, frozenset({0, 2, 5}))


def test_a_layer_faster_in_float_leaves_its_fusion_group() -> None:
    from sensisearch.study.search._seeds import split_faster_in_float

    groups = (("stem", "l1c2"), ("l1c1",), ("l2c1", "l2c2", "l2d"))
    assert split_faster_in_float(groups, {"stem"}) == (("l1c2",), ("stem",), ("l1c1",), ("l2c1", "l2c2", "l2d"))
    assert split_faster_in_float(groups, {"l1c1", "l2c2"}) == (("stem", "l1c2"), ("l1c1",), ("l2c1", "l2d"), ("l2c2",))
    assert split_faster_in_float(groups, set()) == groups
    # Every layer still in exactly one group.
    split = split_faster_in_float(groups, {"stem", "l2d"})
    assert sorted(n for g in split for n in g) == sorted(n for g in groups for n in g)


def test_faster_units_of_groups_and_from_a_predictor() -> None:
    from sensisearch.study.search._guided import faster_units, predicted_faster_units

    units = [("a", "b"), ("c",), ("d", "e")]
    assert faster_units(units, {"e": 1.05, "c": 1.2, "d": 1.01}) == (1, 2)
    assert faster_units(units, {}) == ()

    class Table:
        """A per-layer latency table with an INT8 penalty on "c" (ms per layer and precision; Q/DQ left out)."""

        source, label, unit = "table", "test table", "ms"
        ms = {"a": (1.0, 2.0), "b": (1.0, 2.0), "c": (3.0, 2.0), "d": (0.5, 1.0), "e": (0.5, 0.5)}

        def predict(self, precisions: dict) -> float:
            return sum(int8 if precisions[n] is Precision.INT8 else flt for n, (int8, flt) in self.ms.items())

        def speedup(self, precisions: dict) -> float:
            return self.predict({n: Precision.FP32 for n in self.ms}) / self.predict(precisions)

    # All-INT8 6.5 ms; c in float 5.5 ms (1.18x); d+e in float 7.0; a+b in float 8.5.
    assert predicted_faster_units(Table(), list(Table.ms), units, Precision.FP16) == (1,)


def test_the_speed_phase_follows_greedy_and_the_sampler_holds_what_it_kept_in_float() -> None:
    """A real Optuna study: all-INT8 within the bound (boundary k = 0, greedy has nothing to put back), unit 15 faster
    in float: the next proposal is all-INT8 but unit 15 (phase "speed"); once that is within the bound, the sampler's
    proposals keep unit 15 in float and the other held units INT8, and the speed trial is what verify is told of."""
    from sensisearch.study.search._guided import PHASE_ATTR, SAMPLER_FREE_UNITS, SPEED, speed_trials

    plan, study = _twenty_unit_study((CalibrationAlgorithm.MINMAX,), faster_in_float=(15,))
    dists = plan.distributions
    trial = study.ask(dists)
    assert plan.floats_of(trial.params) == frozenset({15})
    assert study._storage.get_trial(trial._trial_id).system_attrs[PHASE_ATTR] == SPEED
    study.tell(trial, [49.4, 0.6])  # its own timing says slower: kept all the same (within the bound)
    held = [plan.param(u) for i, u in enumerate(plan.units) if i >= SAMPLER_FREE_UNITS and i != 15]
    for _ in range(6):
        proposal = study.ask(dists)
        assert proposal.params[plan.param(plan.units[15])] == Precision.FP32.value
        assert all(proposal.params[name] == Precision.INT8.value for name in held)
        study.tell(proposal, [49.0, 0.7])
    assert speed_trials(study.get_trials(deepcopy=False)) == {trial.number}


def test_the_sampler_chooses_among_calibrations_within_the_bound_on_all_int8() -> None:
    from sensisearch.study.search._guided import competitive_algorithms

    seen = [(36.9, "mse"), (36.88, "percentile"), (34.7, "minmax"), (27.7, "entropy"), (35.3, "mse")]  # mse twice (bias)
    assert competitive_algorithms(seen, 0.5) == ("mse", "percentile")
    assert competitive_algorithms(seen, 3.0) == ("mse", "percentile", "minmax")
    assert competitive_algorithms([], 0.5) == ()


def test_a_stored_study_keeps_its_sampler_and_a_new_one_gets_the_guided_default() -> None:
    new = resolve_search(StudySettings.from_flat(example="digits"), None)
    assert (new.search.sampler, new.search.search) == ("guided", "groups")
    legacy = resolve_search(StudySettings.from_flat(example="digits"), {})  # stored before settings named a sampler
    assert (legacy.search.sampler, legacy.search.search) == ("tpe", "full")
    stored = resolve_search(StudySettings.from_flat(example="digits"), {"sampler": "seeded", "search": "topk"})
    assert (stored.search.sampler, stored.search.search) == ("seeded", "topk")
    flag = resolve_search(StudySettings.from_flat(example="digits", sampler="nsga2"), {"sampler": "tpe", "search": "full"})
    assert (flag.search.sampler, flag.search.search) == ("nsga2", "full")


@pytest.mark.slow
def test_boundary_on_digits_matches_brute_force(tmp_path: Path) -> None:
    """Real ORT builds: every "all-INT8 minus the top-k groups" of the digits ResNet scored (brute force),
    then the bisection run against the same scorer must land on a transition the brute force confirms."""
    ctx = prepare(StudySettings.from_flat(
        example="digits", out=tmp_path, eval_limit=300, sample_counts=[128], algorithms=[CalibrationAlgorithm.MINMAX],
        backend="onnxruntime", latency_seconds=0.05, search="groups", sampler="guided",
    ))
    profile, _ = sensitivity_profile(ctx.sensitivity_inputs())
    assert ctx.space.groups is not None
    units = rank_groups(ctx.space.groups, profile.ranking)
    layers = list(ctx.space.layers)
    choice = profile.calibration_choice
    calls: list[int] = []

    def metric(k: int) -> float:
        calls.append(k)
        floats = {n for u in units[:k] for n in u}
        config = TrialConfig({n: Precision.FP32 if n in floats else Precision.INT8 for n in layers}, choice)
        return score_config(ctx.pipeline, config, tmp_path / "work")[0].value

    brute = [metric(k) for k in range(len(units) + 1)]
    calls.clear()
    # A bound between all-INT8 and FP32 so the boundary is not at either end, where the curve allows one.
    # (all-float, k = every unit, is FP32: feasible by definition, so the bound is at most its value).
    inner = sorted({v for v in brute[1:-1] if brute[0] < v <= brute[-1]})
    threshold = inner[len(inner) // 2] if inner else brute[-1]
    k, _ = find_boundary(lambda k: brute[k] if (calls.append(k) or True) else 0.0, len(units), threshold)
    assert brute[k] >= threshold
    assert k == 0 or brute[k - 1] < threshold  # a transition: feasible here, not one unit less
    infeasible = [i for i, v in enumerate(brute) if v < threshold]
    if infeasible == list(range(len(infeasible))):
        assert k == len(infeasible)  # where the curve is monotone its one boundary is found
    else:  # not monotone (digits INT8 layers can score above FP32): a transition the brute force confirms
        assert k in {i + 1 for i in infeasible} or k == 0
    assert len(calls) < len(brute)  # fewer evaluations than the brute force


@pytest.mark.slow
def test_bias_correction_is_a_calibration_choice_of_the_guided_study(tmp_path: Path) -> None:
    """The guided study searches it (one more calibration parameter); a corrected all-INT8 builds and scores on
    real ORT, differs from the uncorrected one in its deployable, and a study made without it keeps its space."""
    import onnx

    ctx = prepare(StudySettings.from_flat(
        example="digits", out=tmp_path / "g", eval_limit=200, sample_counts=[128], algorithms=[CalibrationAlgorithm.MINMAX],
        backend="onnxruntime", latency_seconds=0.05,
    ))
    assert ctx.space.bias_correction == (False, True)
    plain = ctx.space.uniform(Precision.INT8)
    corrected = TrialConfig(plain.precisions, dataclasses.replace(plain.calibration, bias_correction=True))
    assert ctx.space.params_for(corrected)["calib_bias_correction"] is True
    a, _ = ctx.pipeline.emit(plain, tmp_path / "a")
    b, _ = ctx.pipeline.emit(corrected, tmp_path / "b")
    biases = lambda p: {i.name: i.raw_data for i in onnx.load(str(p)).graph.initializer}  # noqa: E731
    assert biases(a) != biases(b)
    assert 0 < score_config(ctx.pipeline, corrected, tmp_path / "w")[0].value <= 100
    tpe = resolve_search(StudySettings.from_flat(example="digits", sampler="tpe"), None)
    from sensisearch.study.config._settings import bias_choices

    assert bias_choices(tpe) == (False,)


def test_a_study_without_int8_defaults_to_tpe_over_groups() -> None:
    settings = resolve_search(StudySettings.from_flat(example="digits", precisions=[Precision.FP16, Precision.FP32]), None)
    assert (settings.search.sampler, settings.search.search) == ("tpe", "groups")
