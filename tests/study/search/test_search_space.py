"""Issue 10: the fusion-group search space (``--search groups``) and its seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna

from sensisearch.cli import main
from sensisearch.examples import load_example
from sensisearch.model.analysis import analyze_model
from sensisearch.quantize import TENSORRT, ONNXRUNTIME_CPU, GraphIndex, fusion_groups
from sensisearch.quantize.config import CalibrationAlgorithm, CalibrationChoice, Precision, TrialConfig
from sensisearch.study.search._seeds import groups_space, seed_configs
from sensisearch.study.search._space import GROUP_PREFIX, SearchSpace

from conftest import require_shared


def _conv_behind(index: GraphIndex, tensor: str) -> str | None:
    """Independent reading: the Conv whose output, after at most one Relu or SiLU (Sigmoid+Mul), is ``tensor``."""
    node = index.nodes[index.producer[tensor]]
    if node.op_type == "Conv":
        return node.name
    if node.op_type == "Relu":
        inner = index.nodes[index.producer[node.input[0]]]
        return inner.name if inner.op_type == "Conv" else None
    if node.op_type == "Mul":
        producers = [index.nodes[index.producer[i]] for i in node.input if i in index.producer]
        convs = [p for p in producers if p.op_type == "Conv"]
        return convs[0].name if convs and any(p.op_type == "Sigmoid" for p in producers) else None
    return None


def _check_partition(groups, layers) -> None:
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(layers) and len(flat) == len(set(flat))  # every layer in exactly one group


def test_digits_groups_follow_residual_adds() -> None:
    info, model = analyze_model(load_example("digits").model)
    index = GraphIndex(model)
    layers = [l.name for l in info.layers]
    for profile in (TENSORRT, ONNXRUNTIME_CPU):
        groups = fusion_groups(index, info.layers, profile)
        _check_partition(groups, layers)
        group_of = {n: g for g in groups for n in g}
        adds = [n for n in index.nodes if n.op_type == "Add" and not any(index.is_constant(i) for i in n.input)]
        assert len(adds) == 3  # stem->layer1, layer2, layer3 residuals
        expected = []
        for add in adds:
            a, b = (_conv_behind(index, t) for t in add.input)
            assert a and b
            assert group_of[a] == group_of[b]
            expected.append({a, b})
        # Nothing else joins: each Add merges two singletons, so 10 layers -> 7 groups.
        assert sorted(map(sorted, expected)) == sorted(sorted(g) for g in groups if len(g) > 1)
        assert len(groups) == len(layers) - 3


def test_yolov5n_groups_against_its_architecture() -> None:
    info, model = analyze_model(require_shared("yolov5n.onnx"))
    index = GraphIndex(model)
    layers = [l.name for l in info.layers]
    groups = fusion_groups(index, info.layers, TENSORRT)
    _check_partition(groups, layers)
    group_of = {n: set(g) for g in groups for n in g}
    # Every residual Add (the bottlenecks of the backbone C3 blocks) joins its two producing convs.
    # (A chained bottleneck's skip input is the previous Add's output: follow it to its convs.)
    def convs(tensor: str) -> set[str]:
        node = index.nodes[index.producer[tensor]]
        if node.op_type == "Add":
            return convs(node.input[0]) | convs(node.input[1])
        conv = _conv_behind(index, tensor)
        return {conv} if conv else set()

    adds = [n for n in index.nodes if n.op_type == "Add" and all(i in index.producer for i in n.input)]
    residual = [convs(n.input[0]) | convs(n.input[1]) for n in adds]
    residual = [r for r in residual if len(r) >= 2]
    assert len(residual) == 7  # model.2: 1, model.4: 2, model.6: 3, model.8: 1 bottlenecks
    for members in residual:
        assert all(members <= group_of[m] for m in members)
    # YOLOv5's yaml, read independently: a shortcut C3 shares one precision over cv1, cv2 and
    # every bottleneck's cv2 (Add chain + Concat); a head C3 (no shortcut) over cv2 and its m.0.cv2;
    # the neck's Concats join the backbone C3 outputs with the upsampled / downsampled convs.
    for block, n in (("2", 1), ("4", 2), ("6", 3), ("8", 1)):
        members = {f"/model.{block}/cv1/conv/Conv", f"/model.{block}/cv2/conv/Conv"} | {
            f"/model.{block}/m/m.{i}/cv2/conv/Conv" for i in range(n)}
        assert group_of[f"/model.{block}/cv1/conv/Conv"] == members
    for block in ("13", "17", "20", "23"):
        assert group_of[f"/model.{block}/cv2/conv/Conv"] == {f"/model.{block}/cv2/conv/Conv", f"/model.{block}/m/m.0/cv2/conv/Conv"}
    assert group_of["/model.4/cv3/conv/Conv"] == {"/model.4/cv3/conv/Conv", "/model.14/conv/Conv", "/model.18/conv/Conv"}
    assert group_of["/model.6/cv3/conv/Conv"] == {"/model.6/cv3/conv/Conv", "/model.10/conv/Conv", "/model.21/conv/Conv"}
    for detect in (n for n in layers if re.match(r"/model\.24/m\.\d/Conv", n)):
        assert group_of[detect] == {detect}
    merged = (2 + 3 + 4 + 2) + 4 * 1 + 2 * 2  # members beyond the first of each multi-layer group
    assert len(groups) == len(layers) - merged == 41


def _space(layers, groups) -> SearchSpace:
    base = SearchSpace(
        layers=tuple(layers), precisions=(Precision.INT8, Precision.FP16, Precision.FP32),
        algorithms=tuple(CalibrationAlgorithm), sample_counts=(64, 128), percentiles=(99.9, 99.99),
        default_calibration=CalibrationChoice(CalibrationAlgorithm.MSE, 128),
    )
    return groups_space(base, groups)


def test_groups_space_round_trips_through_optuna() -> None:
    info, model = analyze_model(load_example("digits").model)
    layers = [l.name for l in info.layers]
    groups = fusion_groups(GraphIndex(model), info.layers, TENSORRT)
    space = _space(layers, groups)
    precision_cycle = [Precision.FP16, Precision.INT8, Precision.FP32]
    config = TrialConfig(
        {n: precision_cycle[i % 3] for i, g in enumerate(groups) for n in g},
        CalibrationChoice(CalibrationAlgorithm.MIXED, 64, 99.9),
    )
    assert space.expresses(config)
    params = space.params_for(config)
    assert sorted(k for k in params if k.startswith(GROUP_PREFIX)) == sorted(GROUP_PREFIX + g[0] for g in groups)
    assert space.suggest(optuna.trial.FixedTrial(params)) == config
    # The same through a real study: an enqueued trial decodes to the same configuration.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial(params)
    trial = study.ask()
    assert space.suggest(trial) == config
    # A configuration that splits a group is not expressible, and seeds close over their groups.
    split = dict(config.precisions)
    big = next(g for g in groups if len(g) > 1)
    split[big[0]], split[big[1]] = Precision.INT8, Precision.FP32
    assert not space.expresses(TrialConfig(split, config.calibration))
    seeds = seed_configs(layers, [big[1], *layers], config.calibration, head_rule=[big[0]], groups=groups)
    assert seeds and all(space.expresses(c) for _, c in seeds)
    assert set(seeds[0][1].layers_with(Precision.FP32)) == set(big)  # top-1 group = the most sensitive layer's group


def test_digits_study_with_groups_search(tmp_path: Path) -> None:
    out = tmp_path / "g"
    code = main(["run", "--example", "digits", "--search", "groups", "--budget", "3", "--out", str(out),
                 "--latency-seconds", "0.2", "--no-verify", "--seed", "3"])
    assert code == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    complete = [t for t in study.trials if t.state is optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 3
    info, model = analyze_model(load_example("digits").model)
    groups = fusion_groups(GraphIndex(model), info.layers, ONNXRUNTIME_CPU)
    # A layer the timed probes found faster in float on its own leaves its group (split_faster_in_float).
    from sensisearch.study.search._seeds import split_faster_in_float
    from sensisearch.study.search._sensitivity import SensitivityProfile

    profile = SensitivityProfile.from_dict(json.loads((out / "sensitivity.json").read_text()))
    assert all(r.revert_speedup is not None for r in profile.layers)
    groups = split_faster_in_float(groups, profile.faster_in_float)
    for t in complete:
        layer_params = [k for k in t.params if k.startswith("layer:")]
        assert not layer_params
        assert {k for k in t.params if k.startswith(GROUP_PREFIX)} == {GROUP_PREFIX + g[0] for g in groups}
    for trial_dir in sorted((out / "trials").iterdir()):
        record = json.loads((trial_dir / "trial.json").read_text())
        precisions = record["config"]["precisions"]
        for g in groups:
            assert len({precisions[n] for n in g}) == 1
