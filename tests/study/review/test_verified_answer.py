"""One answer, all of it verified: latency classes, verify to a fixed point, the A/A control, load-aware verify.

Real ONNX Runtime and a real Optuna storage (the digits example). Timings are never
asserted beyond the A/A control being 1.00 within its CI (or tolerance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sensisearch.cli import main
from sensisearch.measure import control_ok
from sensisearch.study.review._verify import MAX_VERIFY_ROUNDS, SETTLED_CI_WIDTH
from sensisearch.study.store._classes import latency_class_attrs, read_latency_class, read_latency_classes
from sensisearch.study.store._record import VERIFY_SUMMARY_ATTR
from sensisearch.study.store._results import pareto_front, records
from sensisearch.study.search._space import ALGORITHM, PERCENTILE

pytestmark = pytest.mark.slow

# Plain TPE: these tests arrange trials by number and count, which the default guided study's probes would shift.
RUN = ["--example", "digits", "--sample-counts", "64", "--seed", "3", "--timing-max-seconds", "0.5",
       "--timing-target-ci", "0.5", "--no-verify", "--sampler", "tpe", "--search", "full"]


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="digits_resnet", storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verified")
    assert main(["run", *RUN, "--budget", "3", "--out", str(out)]) == 0
    return out


def test_calibration_only_variants_share_one_timing_and_one_figure(study_dir: Path) -> None:
    study = _study(study_dir)
    int8 = next(t for t in study.trials if t.user_attrs.get("baseline") == "int8")
    params = dict(int8.params)
    # The same placement with another calibration: only Q/DQ scale values differ.
    params[ALGORITHM] = "minmax" if params.get(ALGORITHM) != "minmax" else "percentile"
    params.pop(PERCENTILE, None)
    if params[ALGORITHM] == "percentile":
        params[PERCENTILE] = 99.9
    key = int8.user_attrs["latency_class"]
    before = read_latency_class(study.user_attrs, key)
    assert before is not None and before.timings == 1
    # A settled class (CI within --timing-target-ci) is reused untimed; one whose CI is still wider (a busy
    # machine) is timed once more and pooled. Either way one figure, never a second, separate one.
    settled = before.settled(0.5)
    study.enqueue_trial(params)
    assert main(["run", *RUN, "--budget", "4", "--out", str(study_dir)]) == 0
    study = _study(study_dir)
    variant = max(study.trials, key=lambda t: t.number)
    assert variant.params[ALGORITHM] == params[ALGORITHM]
    assert variant.user_attrs["latency_class"] == key
    cls = read_latency_class(study.user_attrs, key)
    assert cls is not None and set(cls.members) == {int8.number, variant.number}
    trial_json = json.loads((study_dir / "trials" / f"{variant.number:04d}" / "trial.json").read_text())
    assert trial_json["latency_class"] == {"key": key, "reused": settled}
    if settled:
        assert cls.timings == 1 and len(cls.ratios) == len(before.ratios)
        assert trial_json["timings"].get("latency", 0.0) < 0.5  # no paired timing ran for it
    else:
        assert cls.timings == 2 and cls.ratios[: len(before.ratios)] == before.ratios  # pooled onto the first
    by_number = {r.number: r for r in records(study)}
    assert by_number[variant.number].paired_speedup == by_number[int8.number].paired_speedup
    assert by_number[variant.number].median_ms == by_number[int8.number].median_ms
    # One figure per placement: at most one member of a class on the front.
    front = pareto_front(list(by_number.values()))
    assert sum(r.latency_class == key for r in front) <= 1


@pytest.fixture()
def cpu_hog() -> object:
    """One bounded busy process per core (each ends by itself after 120 s; the test kills them sooner)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<120: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_verify_refuses_under_a_cpu_hog_and_passes_with_force(study_dir: Path, cpu_hog: object) -> None:
    refused = subprocess.run([sys.executable, "-m", "sensisearch", "verify", str(study_dir), "--seconds", "2"],
                             capture_output=True, text=True, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "busy" in errors[0] and "--force" in errors[0]
    forced = subprocess.run([sys.executable, "-m", "sensisearch", "verify", str(study_dir), "--seconds", "2", "--force"],
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr
    study = _study(study_dir)
    summary = study.user_attrs[VERIFY_SUMMARY_ATTR]
    assert summary["under_load"] and summary["forced_under_load"]
    verified = [r for r in records(study) if r.is_verified]
    assert verified and all(r.verified is not None and r.verified.under_load for r in verified)
    assert "taken under load" in (study_dir / "report.md").read_text()


def test_verification_that_changes_the_front_ends_with_every_front_member_verified(study_dir: Path) -> None:
    study = _study(study_dir)
    recs = records(study)
    # Inflate the in-study figure of a non-FP32 class 40x: it is on the in-study front, and its verified figure is not.
    target = next(r for r in recs if r.baseline != "fp32" and r.latency_class and r.state == "COMPLETE")
    cls = read_latency_class(study.user_attrs, target.latency_class)
    assert cls is not None
    inflated = type(cls).from_dict({**cls.to_dict(), "ratios": [r * 40 for r in cls.ratios]})
    for key, value in latency_class_attrs(inflated).items():
        study.set_user_attr(key, value)
    study.set_user_attr("verified_trials", {})  # as if never verified
    in_study_front = pareto_front(records(study))
    assert target.number in {r.number for r in in_study_front}
    result = subprocess.run([sys.executable, "-m", "sensisearch", "verify", str(study_dir), "--seconds", "2", "--force"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    study = _study(study_dir)
    recs = records(study)
    front = pareto_front(recs)
    assert front and all(r.is_verified for r in front)
    summary = study.user_attrs[VERIFY_SUMMARY_ATTR]
    assert summary["converged"] and summary["unverified"] == []
    # A figure left wider than the settled bound is named, and only after every round was spent re-timing it.
    for r in recs:
        if r.is_verified and r.verified.relative_ci_width > SETTLED_CI_WIDTH:
            assert r.number in summary["unsettled"] and len(summary["rounds"]) == MAX_VERIFY_ROUNDS, (r.number, summary)
    assert all(r.is_verified for r in recs if r.baseline in ("fp32", "int8"))
    pareto = json.loads((study_dir / "pareto.json").read_text())
    assert all(p["verified"] for p in pareto)


def test_fp32_vs_fp32_control_is_one_within_its_ci(study_dir: Path) -> None:
    study = _study(study_dir)
    # Every in-study timing carried the control; the tournament's last round did too.
    for t in study.trials:
        latency = t.user_attrs.get("latency", {})
        if latency.get("class_reused") is False:
            assert latency["control"] is not None and "ratio" in latency["control"]
    control = study.user_attrs[VERIFY_SUMMARY_ATTR]["rounds"][-1]["control"]
    assert control_ok(control["ratio"], tuple(control["ci95"]), control["tolerance"]), control
    assert read_latency_classes(study.user_attrs)


def test_an_arm_whose_artifact_went_after_selection_is_left_out_and_a_broken_one_fails(study_dir: Path, tmp_path: Path) -> None:
    """Workers sharing a study each prune their own trials' artifacts (--keep-artifacts) while another one may be
    verifying: a chosen trial whose file is gone by the time its arm loads is not timed, and the tournament goes on.
    A file that is there but cannot be loaded is still an error."""
    import dataclasses

    from sensisearch.errors import SensisearchError
    from sensisearch.study import open_study, prepare
    from sensisearch.study.review._verify import (
        VerifySettings, _tournament, load_run_settings, select_for_verification, verify_load_policy,
    )

    ctx = prepare(load_run_settings(study_dir), reviewing=True)
    study = open_study(ctx)
    chosen = select_for_verification(records(study))
    fp32, target = chosen[0], chosen[1]
    assert fp32.baseline == "fp32" and target.latency_class != fp32.latency_class
    settings, policy = VerifySettings(seconds=1.0, rounds=3), verify_load_policy(ctx)

    gone = dataclasses.replace(target, artifact=str(tmp_path / "pruned" / "deployable.ort.onnx"))
    entries: dict = {}
    timed = _tournament(ctx, study, settings, None, fp32, [fp32, gone], "artifact", entries, {}, policy, True)
    assert timed.arms == (fp32.number,)
    same_class = {r.number for r in records(study) if r.latency_class == target.latency_class}
    assert fp32.number in entries and not same_class & set(entries)

    broken = tmp_path / "broken.ort.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(SensisearchError, match="could not load"):
        _tournament(ctx, study, settings, None, fp32, [fp32, dataclasses.replace(target, artifact=str(broken))],
                    "artifact", {}, {}, policy, True)


def test_the_latency_class_names_the_timing_threads(study_dir: Path) -> None:
    """A class's figure is a speed-up of sessions with a given thread count: the key is the same on the same
    machine and settings (the resumed run above reused it), and another timing thread count makes another class."""
    from sensisearch.study import prepare
    from sensisearch.study.review._verify import load_run_settings

    ctx = prepare(load_run_settings(study_dir), reviewing=True)
    int8 = next(r for r in records(_study(study_dir)) if r.baseline == "int8")
    assert int8.config is not None
    assert ctx.pipeline.latency_class_key(int8.config) == int8.latency_class
    ctx.backend.timing_threads += 1
    assert ctx.pipeline.latency_class_key(int8.config) != int8.latency_class
