"""TensorRT per-layer times: trtexec's ``--exportProfile`` JSON, parsed and attributed by name.

Format (trtexec ``--exportProfile=<file>``, documented in TensorRT's trtexec README,
"Tool command line arguments", and written by ``samples/common/sampleReporting.cpp``
``Profiler::exportJSONProfile``): a JSON array whose first element is
``{"count": <profiled iterations>}`` and every other element one engine layer,
``{"name": ..., "timeMs": <total over count>, "averageMs": ..., "medianMs": ...,
"percentage": ...}``. Engine layers are named after the ONNX nodes fused into them
(``"/model.0/conv/Conv + PWN(/model.0/act/Sigmoid, /model.0/act/Mul)"``); precision
changes show as ``"Reformatting CopyNode for ..."`` layers, which go to the rest
(the table's layout term). There is no GPU here: the runtime part only drives
``trtexec --loadEngine E --exportProfile P`` (``--separateProfileRun`` keeps the
profiler out of the timed runs), exactly per trtexec's documented flags.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sensisearch.errors import SensisearchError
from sensisearch.latency._attribution import AttributedKernels, charge

if TYPE_CHECKING:
    from sensisearch.latency._attribution import NameAttribution


def parse_trtexec_profile(data: Sequence[Any], source: str = "profile") -> dict[str, float]:
    """Engine layer name -> average ms per inference, from a parsed ``--exportProfile`` array."""
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "count" not in data[0]:
        raise SensisearchError(f"{source}: not a trtexec --exportProfile JSON (expected [{{\"count\": N}}, {{\"name\", \"averageMs\"}}...])")
    count = max(int(data[0]["count"]), 1)
    layers: dict[str, float] = {}
    for entry in data[1:]:
        if not isinstance(entry, dict) or "name" not in entry:
            raise SensisearchError(f"{source}: a layer entry has no name")
        ms = float(entry["averageMs"]) if "averageMs" in entry else float(entry["timeMs"]) / count
        layers[str(entry["name"])] = layers.get(str(entry["name"]), 0.0) + ms
    return layers


def attribute_tensorrt(layers: dict[str, float], attribution: NameAttribution) -> AttributedKernels:
    """Engine layer times (ms) -> per ONNX layer, per Q/DQ tensor and the rest (one kernel per engine layer)."""
    return charge((attribution.tensorrt_layer(name), ms) for name, ms in layers.items())


def trtexec_profile(engine: Path, out: Path, iterations: int = 100) -> dict[str, float]:
    """Run a built engine under trtexec's per-layer profiler (GPU machine only)."""
    exe = shutil.which("trtexec")
    if exe is None:
        raise SensisearchError("--backend tensorrt: trtexec is not on PATH; install TensorRT's binaries on the GPU machine")
    cmd = [exe, f"--loadEngine={engine}", f"--exportProfile={out}", "--separateProfileRun", f"--iterations={iterations}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SensisearchError(f"trtexec failed on {engine}: {tail[0]}")
    return parse_trtexec_profile(json.loads(out.read_text()), str(out))
