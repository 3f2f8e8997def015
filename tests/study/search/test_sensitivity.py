"""Issue 10: layer sensitivity, the seeds it gives the study, and the profile override (real ORT, real Optuna storage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
from onnx import numpy_helper

from sensisearch.cli import main
from sensisearch.errors import SensisearchError
from sensisearch.model.analysis import analyze_model
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study import finished_count
from sensisearch.study.search._budget import searched_budget
from sensisearch.study.search._seeds import SEEDS_ENQUEUED_ATTR, head_rule_layers, seed_configs
from sensisearch.study.search._sensitivity import (
    MIN_REVERT_GAIN,
    PROBE_BUDGET_SHARE,
    LayerProbe,
    LayerSensitivity,
    SensitivityProfile,
    faster_in_float,
    output_distortion,
    probe_plan,
    rank_layers,
    sensitivity_profile,
    spearman,
)
from sensisearch.study.config._settings import StudySettings, merge_settings


# --------------------------------------------------------------------------- pure parts
def test_rank_layers_orders_by_measured_damage_then_distortion() -> None:
    probes = [
        LayerProbe("a", only_int8=90.0, all_but=80.0, distortion=1e-4),  # alone 10, recovery 0   -> 10
        LayerProbe("b", only_int8=99.0, all_but=85.0, distortion=1e-5),  # alone 1, recovery 5    -> 6
        LayerProbe("c", only_int8=100.0, all_but=80.0, distortion=3e-3),  # 0 + 0: no effect, large distortion
        LayerProbe("d", only_int8=99.95, all_but=80.05, distortion=5e-3),  # +0.1: within 2 x 0.05 resolution
        LayerProbe("e", only_int8=100.5, all_but=79.0, distortion=9e-3),  # apparent gain -> noise, by distortion
    ]
    rows = rank_layers(probes, fp32=100.0, all_int8=80.0, resolution=0.05)
    assert [r.layer for r in rows] == ["a", "b", "e", "d", "c"]
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5]
    by_name = {r.layer: r for r in rows}
    assert by_name["a"].alone_drop == pytest.approx(10.0) and by_name["a"].recovery == pytest.approx(0.0)
    assert by_name["b"].score == pytest.approx(6.0)
    assert by_name["e"].score == pytest.approx(-1.5)
    assert by_name["d"].score == pytest.approx(0.1)
    # Without a resolution every positive score counts as measured.
    assert [r.layer for r in rank_layers(probes, 100.0, 80.0)] == ["a", "b", "d", "e", "c"]


def test_a_layer_without_an_alone_score_is_ranked_by_its_recovery() -> None:
    probes = [
        LayerProbe("a", only_int8=None, all_but=83.0, distortion=1e-5),  # recovery 3
        LayerProbe("b", only_int8=None, all_but=81.0, distortion=9e-3),  # recovery 1, though far more distortion
        LayerProbe("c", only_int8=None, all_but=80.0, distortion=1e-3),  # no recovery: by distortion after b
        LayerProbe("d", only_int8=None, all_but=80.0, distortion=2e-3),
    ]
    rows = rank_layers(probes, fp32=100.0, all_int8=80.0)
    assert [r.layer for r in rows] == ["a", "b", "d", "c"]
    assert rows[0].alone_drop is None and rows[0].score == pytest.approx(3.0) == rows[0].recovery
    again = SensitivityProfile({}, "m", {}, 100.0, 80.0, rows)
    assert SensitivityProfile.from_dict(json.loads(json.dumps(again.to_dict()))).layers == rows


def _plan_cost(plan, layers: int, algorithms: int, per_probe: int, total: int, subset: bool) -> float:  # noqa: ANN001
    """Images the plan scores, counted independently of probe_plan: every probe it runs, one by one."""
    images = (1 + algorithms + layers) * per_probe + (layers * per_probe if plan.score_alone else 0)
    if subset and plan.rescored:
        images += (2 + (2 if plan.score_alone else 1) * plan.rescored) * total
    return images / total


@pytest.mark.parametrize(("layers", "algorithms", "per_probe", "total", "budget"), [
    (60, 4, 8, 40, 50),  # YOLOv5n, 40 images: only the core fits
    (60, 4, 11, 86, 50),  # YOLOv5n, 86 images: the core and some rescoring
    (60, 4, 125, 1000, 50),  # a large set (probes on an eighth): core 8 trials, the alone scores just miss
    (10, 1, 25, 200, 24),  # digits
    (10, 1, 25, 200, 5),  # a tiny budget: the core alone is over the share, still run (the ranking needs it)
])
def test_probe_plan_keeps_the_probes_within_their_share_of_the_budget(layers, algorithms, per_probe, total, budget) -> None:  # noqa: ANN001
    plan = probe_plan(layers, algorithms, per_probe, total, budget, subset=True)
    share = PROBE_BUDGET_SHARE * budget
    core = (1 + algorithms + layers) * per_probe / total
    cost = _plan_cost(plan, layers, algorithms, per_probe, total, True)
    assert cost <= max(share, core) + 1e-9
    # Nothing that would still fit is left out: one more rescored layer, or the alone scores, would pass the share.
    most = max(2, min(4, layers // 8))
    if plan.rescored < most:
        more = type(plan)(plan.score_alone, plan.rescored + 1)
        assert _plan_cost(more, layers, algorithms, per_probe, total, True) > share
    if not plan.score_alone:
        assert _plan_cost(type(plan)(True, 0), layers, algorithms, per_probe, total, True) > share
    # Without a budget (``sensisearch sensitivity``) every probe runs.
    assert probe_plan(layers, algorithms, per_probe, total, None, subset=True) == type(plan)(True, most)


def test_output_distortion_is_relative_squared_error() -> None:
    ref = [np.array([[3.0, 4.0]]), np.array([0.0, 0.0, 0.0])]
    out = [np.array([[3.0, 5.0]]), np.array([0.0, 1.0, 0.0])]
    assert output_distortion(out, ref) == pytest.approx((1.0 + 1.0) / 25.0)
    assert output_distortion(ref, ref) == 0.0


def test_spearman_of_rankings() -> None:
    assert spearman(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == pytest.approx(1.0)
    assert spearman(["a", "b", "c", "d"], ["d", "c", "b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman(["a", "b"], ["a", "c"])


def test_seed_configs_are_int8_minus_top_k_then_head_rule() -> None:
    layers = [f"l{i}" for i in range(6)]
    ranking = ["l3", "l0", "l5", "l1", "l2", "l4"]
    calib = CalibrationChoice(CalibrationAlgorithm.MSE, 128)
    seeds = seed_configs(layers, ranking, calib, head_rule=["l0", "l3"], ks=(1, 2, 3, 5, 8))
    names = [n for n, _ in seeds]
    # top-8 would be every layer (that is all-FP32, a baseline); the head rule equals top-2: dropped.
    # The head rule joins when the ranking puts its layers in the top 5 (the compact space can then express it).
    assert names[:4] == ["int8 minus top-1", "int8 minus top-2", "int8 minus top-3", "int8 minus top-5"]
    assert names[4:] in ([], ["first conv + head float"])
    floats = {n: set(c.layers_with(Precision.FP32)) for n, c in seeds}
    assert floats["int8 minus top-3"] == {"l3", "l0", "l5"}
    assert floats["int8 minus top-5"] == set(ranking[:5])
    assert all(c.calibration == calib and set(c.precisions) == set(layers) for _, c in seeds)
    head = seed_configs(layers, ranking, calib, head_rule=["l0", "l4"], ks=(1,))
    assert [n for n, _ in head] == ["int8 minus top-1", "first conv + head float"]


def test_head_rule_on_yolov5n_is_first_conv_plus_the_three_detect_convs(yolo_model: Path) -> None:
    info, model = analyze_model(yolo_model)
    head = head_rule_layers(model, info)
    # Independent reference: the Detect convs are the layers of the last module (model.24) in the export.
    detect = [layer.name for layer in info.layers if "model.24" in layer.name]
    assert len(detect) == 3
    assert head == [info.layers[0].name, *detect]


def test_search_settings_are_validated() -> None:
    with pytest.raises(SensisearchError, match="--sampler"):
        merge_settings({"example": "digits", "sampler": "grid"}, {}, None)
    with pytest.raises(SensisearchError, match="--search"):
        merge_settings({"example": "digits", "search": "everything"}, {}, None)
    with pytest.raises(SensisearchError, match="--profile"):
        merge_settings({"example": "digits", "profile": "coreml"}, {}, None)


# --------------------------------------------------------------------------- digits: real probes
def _digits_ctx(out: Path, seed: int, eval_limit: int | None):  # noqa: ANN202 - StudyContext
    from sensisearch.study.run import prepare

    return prepare(StudySettings.from_flat(
        example="digits", out=out, seed=seed, eval_limit=eval_limit, sample_counts=[128],
        algorithms=[CalibrationAlgorithm.MINMAX], backend="onnxruntime", latency_seconds=0.05,
        sampler="tpe", search="full",  # these tests run the probes themselves (the guided default would in prepare)
    ))


@pytest.fixture(scope="module")
def digits_profiles(tmp_path_factory: pytest.TempPathFactory) -> list[SensitivityProfile]:
    profiles = []
    for seed in (0, 1):
        ctx = _digits_ctx(tmp_path_factory.mktemp(f"sens{seed}"), seed, eval_limit=1000)
        profiles.append(sensitivity_profile(ctx.sensitivity_inputs())[0])
    return profiles


def test_sensitivity_ranking_is_stable_across_seeds(digits_profiles: list[SensitivityProfile]) -> None:
    a, b = digits_profiles
    # Probes score an eighth of the 1,000 images first; only layers near the ranking's cut see all of them.
    assert a.calibration != {} and a.eval_count == 125
    assert a.probes >= 2 + 2 * len(a.layers) and a.seconds > 0 and len(a.rescored) <= 4
    rescored = 2 + 2 * len(a.rescored) if a.rescored else 0
    assert a.cost_trials == pytest.approx((a.probes - rescored) * 0.125 + rescored)  # a subset probe is an eighth of a trial
    assert len(a.layers) == 10 and sorted(a.ranking) == sorted(b.ranking)
    assert spearman(a.ranking, b.ranking) >= 0.7
    assert a.ranking[0] == b.ranking[0]


def test_top_layer_is_the_one_whose_int8_hurts_most_measured_directly(
    digits_profiles: list[SensitivityProfile], tmp_path: Path
) -> None:
    """Direct measurement: every only-this-layer-INT8 model built as a full study trial and
    scored on all 2,000 evaluation images (the probes saw the first 1,000)."""
    ctx = _digits_ctx(tmp_path, seed=0, eval_limit=None)
    layers = list(ctx.space.layers)
    choice = digits_profiles[0].calibration_choice
    fp32 = ctx.pipeline.run(TrialConfig.uniform(layers, Precision.FP32), tmp_path / "fp32").evaluation
    assert fp32.count == 2000
    drops = {}
    for layer in layers:
        config = TrialConfig({n: Precision.INT8 if n == layer else Precision.FP32 for n in layers}, choice)
        drops[layer] = fp32.value - ctx.pipeline.run(config, tmp_path / layer.replace("/", "_")).evaluation.value
    assert max(drops, key=drops.__getitem__) == digits_profiles[0].ranking[0]


def test_timed_probes_give_each_layer_its_speed_over_all_int8(digits_profiles: list[SensitivityProfile]) -> None:
    """The digits study is timed here (ONNX Runtime profile): every all-but-this-layer probe was timed against
    all-INT8, the figures survive the JSON round trip, and faster_in_float lists exactly the layers its rule admits."""
    profile = digits_profiles[0]
    for row in profile.layers:
        assert row.revert_speedup is not None
        median, low, high = row.revert_speedup
        assert 0 < low <= median <= high
    again = SensitivityProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.layers == profile.layers
    expected = {r.layer for r in profile.layers if r.revert_speedup[1] > 1 and r.revert_speedup[0] >= 1 + MIN_REVERT_GAIN}
    assert set(profile.faster_in_float) == expected


def test_faster_in_float_needs_the_gain_and_a_ci_above_one() -> None:
    rows = [
        LayerSensitivity("stem", 1, 0.0, 0.0, 0.0, revert_speedup=(1.14, 1.11, 1.16)),
        LayerSensitivity("wide-ci", 2, 0.0, 0.0, 0.0, revert_speedup=(1.10, 0.98, 1.2)),  # CI reaches 1: noise
        LayerSensitivity("small", 3, 0.0, 0.0, 0.0, revert_speedup=(1.02, 1.01, 1.03)),  # below the 3% gain
        LayerSensitivity("fc", 4, 0.0, 0.0, 0.0, revert_speedup=(1.31, 1.2, 1.4)),
        LayerSensitivity("untimed", 5, 0.0, 0.0, 0.0),
        LayerSensitivity("slower", 6, 0.0, 0.0, 0.0, revert_speedup=(0.7, 0.68, 0.72)),
    ]
    assert list(faster_in_float(rows).items()) == [("fc", 1.31), ("stem", 1.14)]
    assert list(faster_in_float(rows, min_gain=0.0)) == ["fc", "stem", "small"]


def test_profile_is_cached_and_keyed(digits_profiles: list[SensitivityProfile], tmp_path: Path) -> None:
    ctx = _digits_ctx(tmp_path, seed=0, eval_limit=200)
    first, cached = sensitivity_profile(ctx.sensitivity_inputs())
    assert not cached
    again, cached = sensitivity_profile(ctx.sensitivity_inputs())
    assert cached and again.to_dict() == first.to_dict()
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert SensitivityProfile.from_dict(data).ranking == first.ranking
    # The review reads the same file: its "all but this layer INT8" drop is what that model measures.
    from sensisearch.study.review._review import read_sensitivity

    rows = {r.layer: r for r in read_sensitivity(tmp_path)}
    top = first.layers[0]
    assert rows[top.layer].drop_only_this_int8 == pytest.approx(top.alone_drop)
    # The probes ran on the fixed subset (an eighth, at least 8 images): the review shows those figures.
    assert first.eval_count == 25
    assert rows[top.layer].drop_all_but_this_int8 == pytest.approx((first.fp32 - first.all_int8) - top.recovery)
    # Another evaluation subset is another study (its own --out); given the first profile's file,
    # it still measures again, because the cache key covers the subset.
    other_out = tmp_path / "other-subset"
    other_out.mkdir()
    (other_out / "sensitivity.json").write_text((tmp_path / "sensitivity.json").read_text())
    other = _digits_ctx(other_out, seed=0, eval_limit=300)
    _, cached = sensitivity_profile(other.sensitivity_inputs())
    assert not cached


# --------------------------------------------------------------------------- the study uses it
def test_seeds_are_enqueued_exactly_once_and_topk_holds_the_rest_int8(tmp_path: Path) -> None:
    common = [
        "run", "--example", "digits", "--out", str(tmp_path), "--sample-counts", "128", "--eval-limit", "300",
        "--latency-seconds", "0.05", "--sampler", "seeded", "--search", "topk", "--top-k", "5", "--profile", "tensorrt",
    ]
    assert main([*common, "--budget", "12"]) == 0
    assert main([*common, "--budget", "17"]) == 0  # resumed: the seeds must not come again
    study = optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{tmp_path / 'study.db'}")
    names = study.user_attrs[SEEDS_ENQUEUED_ATTR]
    # The head rule joins when the ranking puts its layers in the top 5 (the compact space can then express it).
    assert names[:4] == ["int8 minus top-1", "int8 minus top-2", "int8 minus top-3", "int8 minus top-5"]
    assert names[4:] in ([], ["first conv + head float"])
    seeded = [t.user_attrs["seed"] for t in study.trials if "seed" in t.user_attrs]
    assert sorted(seeded) == sorted(names)
    # --budget counts searched configurations less the probes' share; the FP32 and INT8 baselines come on top.
    assert finished_count(study) == searched_budget(17, study.user_attrs) < 17
    ranking = SensitivityProfile.from_dict(study.user_attrs["sensitivity"]).ranking
    assert ranking == SensitivityProfile.from_dict(json.loads((tmp_path / "sensitivity.json").read_text())).ranking
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        original = t.user_attrs.get("duplicate_of")
        if original is not None:  # a repeated proposal is not built again: it takes the first one's result
            assert t.params == study.trials[original].params and "trial_json" not in t.user_attrs
            continue
        config = json.loads((tmp_path / "trials" / f"{t.number:04d}" / "trial.json").read_text())["config"]["precisions"]
        if t.user_attrs.get("baseline"):
            assert set(config.values()) == {t.user_attrs["baseline"]}
            continue
        assert all(config[n] == "int8" for n in ranking[5:])  # outside the top-5: always INT8
        if "seed" in t.user_attrs and "minus" in t.user_attrs["seed"]:
            k = int(t.user_attrs["seed"].rsplit("-", 1)[1])
            assert {n for n, p in config.items() if p != "int8"} == set(ranking[:k])  # FP16 where the target has it


def test_sensitivity_command_shows_each_layers_speed_in_float_only_where_timed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Timed here (ONNX Runtime profile): a speed column and the faster-in-float line, from the profile it wrote.
    Predicted (TensorRT profile on ONNX Runtime, MAC estimate): the probes are not timed, no such column."""
    common = ["sensitivity", "--example", "digits", "--sample-counts", "128", "--algorithms", "minmax",
              "--eval-limit", "200", "--backend", "onnxruntime"]
    assert main([*common, "--out", str(tmp_path / "timed")]) == 0
    shown = capsys.readouterr().out
    profile = SensitivityProfile.from_dict(json.loads((tmp_path / "timed" / "sensitivity.json").read_text()))
    assert "all-but-this speed vs all-INT8" in shown and all(r.revert_speedup is not None for r in profile.layers)
    listed = ", ".join(f"{n} {g:.2f}x" for n, g in profile.faster_in_float.items()) or "none"
    assert f"faster in float than in INT8 (the model with only it in float beats all-INT8): {listed}" in " ".join(shown.split())
    assert main([*common, "--out", str(tmp_path / "predicted"), "--profile", "tensorrt"]) == 0
    shown = capsys.readouterr().out
    profile = SensitivityProfile.from_dict(json.loads((tmp_path / "predicted" / "sensitivity.json").read_text()))
    assert "speed vs all-INT8" not in shown and all(r.revert_speedup is None for r in profile.layers)


def test_tensorrt_profile_on_onnxruntime_scores_the_symmetric_int8_graph(tmp_path: Path) -> None:
    """--profile tensorrt --backend onnxruntime: the deployable has only int8 zero-point-0 Q/DQ (TensorRT's)."""
    assert main([
        "run", "--example", "digits", "--out", str(tmp_path), "--sample-counts", "128", "--eval-limit", "200",
        "--latency-seconds", "0.05", "--budget", "2", "--backend", "onnxruntime", "--profile", "tensorrt",
    ]) == 0
    model = onnx.load(str(tmp_path / "trials" / "0001" / "deployable.onnx"))  # the all-INT8 baseline
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    report = (tmp_path / "report.md").read_text()
    assert "estimate" in report


# --------------------------------------------------------------------------- the labelled latency estimate
def test_layer_macs_match_published_yolov5n_flops(yolo_model: Path) -> None:
    """Ultralytics publishes YOLOv5n at 4.5 GFLOPs (640 px) = ~2.25 G multiply-accumulates."""
    from sensisearch.latency import PRECISION_COST, estimated_cost, layer_macs

    info, model = analyze_model(yolo_model)
    macs = layer_macs(model, info)
    assert set(macs) == set(info.layer_names)
    assert sum(macs.values()) == pytest.approx(2.25e9, rel=0.02)
    first = info.layers[0]  # 6x6 stride-2 conv, 3 -> 16 channels, 320x320 output
    assert macs[first.name] == 6 * 6 * 3 * 16 * 320 * 320
    fp32 = estimated_cost(macs, {n: Precision.FP32 for n in macs})
    int8 = estimated_cost(macs, {n: "int8" for n in macs})
    assert int8 / fp32 == pytest.approx(PRECISION_COST[Precision.INT8] / PRECISION_COST[Precision.FP32])
