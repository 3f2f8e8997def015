"""A study made by the previous release resumes: its study.db, settings.json and study.json as they were written.

``tests/data/legacy_study`` was made before the study package was rebuilt by concept,
with ``sensisearch run --example digits --budget 3 --no-verify`` (3 searched trials
plus the FP32 and all-INT8 baselines). The test continues it to a larger budget.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from sensisearch.measure import machine_identity
from sensisearch.study import StudySettings, TrialRecord, finished_count

LEGACY = Path(__file__).resolve().parents[2] / "data" / "legacy_study"
REPO = Path(__file__).resolve().parents[3]


def this_machine() -> str:
    # The identity's device, as the study records it for the ONNX Runtime backend on a CPU.
    machine = machine_identity()
    return f"{machine.cpu_model} x{machine.cpu_count} {machine.machine}"


def move_here(out: Path) -> str:
    """Copy the legacy study into ``out`` as if it had been made on this machine (its device recorded here)."""
    out.mkdir(parents=True)
    for name in ("study.db", "settings.json", "study.json"):
        shutil.copy2(LEGACY / name, out / name)
    device = this_machine()
    record = json.loads((out / "study.json").read_text())
    record["identity"]["device"] = device
    record["storage"] = f"sqlite:///{out / 'study.db'}"
    (out / "study.json").write_text(json.dumps(record, indent=2))
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=record["study_name"], storage=storage)
    identity = dict(study.user_attrs["identity"])
    identity["device"] = device
    study.set_user_attr("identity", identity)
    return storage


@pytest.mark.slow
def test_a_study_made_by_the_previous_release_resumes_to_a_larger_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    storage = move_here(out)
    name = json.loads((out / "study.json").read_text())["study_name"]
    before = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)
    assert finished_count(optuna.load_study(study_name=name, storage=storage)) == 3

    run = subprocess.run(
        [sys.executable, "-m", "sensisearch", "run", "--example", "digits", "--out", str(out), "--budget", "5",
         "--no-verify", "--isolation", "none"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=True)
    # The old trials are kept as they were; the study went on to the new budget.
    for old in before:
        new = trials[old.number]
        assert (new.state, new.params, new.values, new.user_attrs) == (old.state, old.params, old.values, old.user_attrs)
    assert finished_count(study) == 5
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    searched = [t for t in complete if TrialRecord.from_trial(t).baseline is None and TrialRecord.from_trial(t).duplicate_of is None]
    configs = {json.dumps(t.params, sort_keys=True) for t in searched}
    assert len(configs) == 5
    assert (out / "pareto.json").is_file()
    # Made when TPE over every layer was the default: resumed without search flags it stays that study.
    # (Read through the one serializer: the resumed study's settings are written back nested.)
    stored = StudySettings.from_dict(study.user_attrs["settings"])
    assert (stored.search.sampler, stored.search.search) == ("tpe", "full")
    assert not any("guided_phase" in t.system_attrs for t in trials)
    assert not (out / "sensitivity.json").exists()
