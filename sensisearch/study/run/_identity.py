"""What makes a study one experiment: its identity, and when two configurations are the same.

A study's results are only comparable with each other when every trial ran on
the same model, data, metric, backend and machine. :class:`StudyIdentity`
records those facts once, in the study itself; a later run (a resume, another
worker) computes its own and is refused when they differ, with one line that
names what differs and which flag to change.

:func:`effective_config_key` says when two proposed configurations would build
the same deployable model, so the study never evaluates one twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

from sensisearch.errors import SensisearchError
from sensisearch.fileio import write_json_atomic
from sensisearch.quantize.config import Precision, TrialConfig

if TYPE_CHECKING:
    from sensisearch.backends.base import Backend
    from sensisearch.model.analysis import ModelInfo
    from sensisearch.study.run._context import StudyContext
    from sensisearch.study.search._space import SearchSpace
    from sensisearch.study.config._inputs import EvaluationSetup
    from sensisearch.study.config._settings import StudySettings

# Which flag (or file) a user changes to make each part of the identity differ.
_FLAG_OF_FIELD: dict[str, str] = {
    "model_sha256": "--model",
    "eval_data": "--eval-data / --eval-limit / --annotations",
    "calib_data": "--calib-data / --calib-limit",
    "task": "--task / --evaluator",
    "metric": "--metric",
    "evaluation": "evaluation settings (--preprocess, --mean, --std, --iou, --evaluator)",
    "backend": "--backend",
    "profile": "the backend's quantization profile",
    "timing": "--objective / --latency-batch / --latency-table / --profile (where latency comes from)",
    "search_space": "--precisions / --algorithms / --sample-counts / --percentiles / --bias-correction (auto: searched by --sampler guided)",
    "device": "the machine (CPU model or GPU); run each device type in its own study",
}


@dataclass(frozen=True)
class StudyIdentity:
    """Everything a trial's numbers depend on besides its configuration.

    Values are plain JSON types so the identity round-trips through the
    storage's study attributes unchanged.
    """

    model_sha256: str
    eval_data: str
    """Content digest of the evaluation data, including any limit."""
    calib_data: str | None
    """Content digest of the calibration data (None when nothing is INT8)."""
    task: str
    metric: str
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    """Preprocessing, NMS IoU, evaluator function: whatever changes the metric."""
    backend: str = ""
    profile: str = ""
    timing: Mapping[str, Any] = field(default_factory=dict)
    """What latency means: objective, batch size."""
    search_space: Mapping[str, Any] = field(default_factory=dict)
    device: str = ""
    """CPU model, or GPU name and driver: latencies of different devices never share a front."""

    def to_dict(self) -> dict[str, Any]:
        # Through JSON so tuples become lists, exactly as the storage returns them.
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudyIdentity":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, recorded: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
        """One phrase per identity field that differs from ``recorded`` (a stored :meth:`to_dict`).

        Fields the recorded identity does not have (written by an older
        version) are not reported, nor the fields in ``ignore``.
        """
        current = self.to_dict()
        out: list[str] = []
        for name, value in current.items():
            if name not in recorded or name in ignore:
                continue
            old = recorded[name]
            if old == value:
                continue
            out.append(f"{_FLAG_OF_FIELD.get(name, name)}: {_short(old)} in the study, {_short(value)} now")
        return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_short(v)}" for k, v in sorted(value.items())) or "{}"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "…"


def effective_config_key(config: TrialConfig) -> str:
    """A canonical string: equal for two configurations iff they build the same model.

    Calibration only matters when some layer is INT8, the sample count and
    clip percentile only for the algorithms that read them: the clip
    percentile is meaningless to minmax, entropy and MSE.
    """
    precisions = {name: p.value for name, p in sorted(config.precisions.items())}
    calibration: dict[str, Any] = {}
    if any(p is Precision.INT8 for p in config.precisions.values()):
        choice = config.calibration
        calibration = {"algorithm": choice.algorithm.value, "samples": choice.samples}
        if choice.algorithm.reads_percentile:
            calibration["percentile"] = choice.percentile
        if choice.bias_correction:
            calibration["bias_correction"] = True
    return json.dumps({"precisions": precisions, "calibration": calibration}, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------- from a study context

STUDY_FILE = "study.json"
# Files a study writes into --out: a folder holding any of them belongs to a study.
# (study.db is not among them: a shared storage is checked by the identity stored in it.)
STUDY_OUTPUTS = ("trials", "pareto.json", "pareto.csv", "winner", "report.md")


def identity_for(ctx: StudyContext) -> StudyIdentity:
    """The identity of the study ``ctx`` describes (model, data, metric, backend, search space, machine).

    """
    from sensisearch.study.trial._predicted import latency_source_identity

    return identity_of(ctx.settings, ctx.info, ctx.evaluation, ctx.backend, ctx.space,
                       latency_source_identity(ctx.settings, ctx.pipeline.predictor))


def identity_of(
    settings: StudySettings, info: ModelInfo, evaluation: EvaluationSetup, backend: Backend, space: SearchSpace,
    latency_source: Mapping[str, Any] | None = None,
) -> StudyIdentity:
    """:func:`identity_for` from the parts, so a run is checked before its calibration (the context needs it)."""
    from sensisearch.measure import machine_identity

    describe = dict(evaluation.evaluator.describe())
    backend_facts = backend.describe()
    gpu = backend_facts.get("gpu") or backend_facts.get("gpu_name")
    if gpu:
        device = f"{gpu} (driver {backend_facts.get('driver', backend_facts.get('driver_version', '?'))})"
    else:
        machine = machine_identity()
        device = f"{machine.cpu_model} x{machine.cpu_count} {machine.machine}"
    # The evaluation setup decides the data digests, task, metric and evaluation settings (one home).
    parts = evaluation.identity_parts()
    parts["evaluation"] = {**parts["evaluation"], "input_shape": describe.get("input_shape")}
    return StudyIdentity(
        model_sha256=info.sha256,
        **parts,
        backend=backend.name,
        profile=backend.profile.name,
        timing={"objective": settings.measurement.objective, "latency_batch": settings.backend.latency_batch, "throughput_batch": settings.measurement.throughput_batch,
                **({"latency": latency_source} if latency_source else {})},  # predicted latency's source
        search_space={
            "layers": list(space.layers),
            "precisions": [p.value for p in space.precisions],
            "algorithms": [a.value for a in space.algorithms],
            "sample_counts": list(space.sample_counts),
            "percentiles": list(space.percentiles),
            # Only where searched: a study made before bias correction keeps its identity.
            **({"bias_correction": list(space.bias_correction)} if space.bias_correction != (False,) else {}),
        },
        device=device,
    )


def refusal(differences: list[str], where: str) -> str:
    """The one line that refuses a run whose identity differs from the study's."""
    return (
        f"{where} holds another experiment ({'; '.join(differences)}); "
        "start a new study with another --out (or --study-name with --storage), or re-run with the study's settings"
    )


def check_out_owner(out: Path, study_name: str, model_sha256: str) -> None:
    """Refuse, before anything is written, an ``--out`` that holds another study's files.

    Only what is known before the data are read (study name and model) is checked
    here; the full identity is compared by :func:`check_out_identity`.
    """
    if out.exists() and not out.is_dir():
        raise SensisearchError(f"--out {out}: is a file, not a folder; pass a folder for the study's outputs")
    recorded = read_study_file(out)
    if recorded is None:
        existing = [name for name in STUDY_OUTPUTS if (out / name).exists()]
        if existing:
            raise SensisearchError(
                f"--out {out}: holds study files ({', '.join(existing)}) without a {STUDY_FILE} saying whose; "
                "pass an empty or new --out"
            )
        return
    if recorded.get("study_name") != study_name:
        raise SensisearchError(
            f"--out {out}: belongs to study '{recorded.get('study_name')}', not '{study_name}'; "
            "pass another --out for a new study"
        )
    old = (recorded.get("identity") or {}).get("model_sha256")
    if old is not None and old != model_sha256:
        raise SensisearchError(refusal([f"--model: {_short(old)} in the study, {_short(model_sha256)} now"], f"--out {out}"))


REVIEW_MAY_DIFFER = ("device",)
"""Identity fields a command that only reads a finished study (``verify``, ``report``) may see differ:
stage 2 runs on the target, whose CPU is not the study machine's. Its figures say where they were timed."""


def check_out_identity(out: Path, identity: StudyIdentity, ignore: Collection[str] = ()) -> None:
    recorded = read_study_file(out)
    if recorded is None:
        return
    differences = identity.differences(recorded.get("identity") or {}, ignore)
    if differences:
        raise SensisearchError(refusal(differences, f"--out {out}"))


def read_study_file(out: Path) -> dict[str, Any] | None:
    path = out / STUDY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SensisearchError(f"{path}: unreadable ({type(exc).__name__}); restore it or pass another --out") from exc
    if not isinstance(data, dict):
        raise SensisearchError(f"{path}: not a study record; restore it or pass another --out")
    return data


def write_study_file(out: Path, identity: StudyIdentity, study_name: str, masked_storage: str) -> None:
    """``<out>/study.json``: which study owns this folder (written atomically, once)."""
    if read_study_file(out) is not None:
        return
    write_json_atomic(out / STUDY_FILE, {"study_name": study_name, "storage": masked_storage, "identity": identity.to_dict()})
