"""IR versions that the installed onnxruntime can load.

``onnx.helper.make_model`` stamps a new model with the IR version of the installed
``onnx`` package, and the two packages are released on separate schedules: onnx 1.23
writes IR 14 while onnxruntime 1.20 loads at most IR 10 (ORT refuses such a model with
"Unsupported model IR version"). Both packages are allowed anywhere inside their
declared ranges, so every model sensisearch creates takes its IR version from here.

The limit is found by asking onnxruntime itself (a tiny model, once per process)
rather than from a table by release, so it stays right for releases newer than this
file.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

import onnx
from onnx import TensorProto, helper

from sensisearch.errors import SensisearchError

log = logging.getLogger(__name__)

# Lowest IR worth probing: every onnxruntime release sensisearch supports loads IR 7
# (opset 13, the lowest opset per-channel INT8 needs).
_PROBE_FLOOR = 7
_MAX_IR_RE = re.compile(r"max supported IR version:\s*(\d+)")


def _probe_model(ir_version: int) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ir_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _loads(ir_version: int) -> tuple[bool, str]:
    import onnxruntime as ort

    try:
        ort.InferenceSession(_probe_model(ir_version), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, which differ by release
        return False, str(exc)
    return True, ""


# An IR no onnxruntime release loads: the refusal names the release's limit.
_UNLOADABLE_IR = 10_000


@functools.cache
def onnxruntime_max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime loads."""
    ok, message = _loads(_UNLOADABLE_IR)
    match = _MAX_IR_RE.search(message)
    if not ok and match and _loads(int(match.group(1)))[0]:
        found = int(match.group(1))
    else:
        # A release that words its refusal differently: try downwards from what onnx knows.
        found = next((ir for ir in range(onnx.IR_VERSION, _PROBE_FLOOR - 1, -1) if _loads(ir)[0]), _PROBE_FLOOR)
    log.debug("onnxruntime loads up to IR %d (onnx writes IR %d)", found, onnx.IR_VERSION)
    return found


def max_ir_version() -> int:
    """Highest ONNX IR version that both the installed onnx and onnxruntime handle."""
    return min(onnx.IR_VERSION, onnxruntime_max_ir_version())


def check_loadable_ir(model: onnx.ModelProto, source: str) -> None:
    """One line when onnxruntime cannot load ``model`` for its IR version.

    Calibration statistics are always collected with onnxruntime, whatever the
    backend, so a model it refuses cannot be searched at all.
    """
    limit = onnxruntime_max_ir_version()
    if model.ir_version > limit:
        import onnxruntime as ort

        raise SensisearchError(
            f"{source}: ONNX IR version {model.ir_version} is newer than onnxruntime {ort.__version__} loads "
            f"(at most IR {limit}); upgrade onnxruntime, or re-export the model with an onnx release that writes IR {limit}"
        )


def ir_version_for(opset_imports: Iterable[onnx.OperatorSetIdProto]) -> int:
    """IR version for a new model importing ``opset_imports`` that onnxruntime can load.

    The newest IR both packages handle, but never below what the opsets require.
    """
    opsets = list(opset_imports)
    needed = helper.find_min_ir_version_for(opsets)
    limit = max_ir_version()
    if needed > limit:
        import onnxruntime as ort

        wanted = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in opsets)
        raise SensisearchError(
            f"opset {wanted} needs ONNX IR {needed}, but onnxruntime {ort.__version__} loads at most IR {limit}; "
            "upgrade onnxruntime"
        )
    return limit


def make_model(graph: onnx.GraphProto, opset: int = 13, ir_version: int | None = None, **kwargs: object) -> onnx.ModelProto:
    """``helper.make_model`` for default-domain ``opset``, at an IR onnxruntime can load.

    ``ir_version`` pins the version instead (a model written to an older IR on purpose).
    """
    opset_imports = kwargs.pop("opset_imports", None) or [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_imports, **kwargs)
    model.ir_version = ir_version if ir_version is not None else ir_version_for(model.opset_import)
    return model
