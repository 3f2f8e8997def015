"""A per-layer latency table measured once on the target, and what it predicts.

predicted latency(config) =
    sum over layers of ``layers[layer][precision]``          (the layer's kernels, with what the backend fused into it)
  + sum over the config's Q/DQ tensors of ``boundaries[tensor]`` at a precision boundary, else ``internal_qdq[tensor]``
  + ``rest_ms`` + ``layout_ms_per_boundary`` x (precision boundaries of the config)

The Q/DQ tensors and the boundaries come from :func:`~sensisearch.quantize.placement.plan_placement`
for the table's quantization profile, the same placement the emitter writes, so the
table never holds a second copy of where Q/DQ goes. A *precision boundary* is a Q/DQ
tensor that is not produced by an INT8 layer (or its activation) or by an op of the
placement's INT8 region (``Placement.region_outputs``), or that a float op reads (``float_reader``): where the backend changes format (ONNX Runtime's
Reorder/Transpose nodes, TensorRT's "Reformatting CopyNode" layers). Their cost is
not per tensor in the profiles (the layout nodes carry generated names), so it is
one rate, fitted by least squares over the profiled configurations together with the
configuration-independent rest (non-layer ops: Resize, Concat, decode, ...).
Boundary Q/DQ costs are kept per tensor (not per element with a fitted rate): every
tensor a placement can quantize is measured by the profiled configurations (all-INT8
and two complementary checkerboards), and per-tensor costs keep the layout effects a
rate would average away; a tensor never measured costs the median of the measured ones.

End-to-end anchor. The profiler's kernel events are not what ``session.run`` costs. Measured on
digits (batch 1, 2 threads, machine loaded), the same four configurations, profiled vs timed
without the profiler (paired, ``time_interleaved``):

================  =======  ==============  ==================  ===================
onnxruntime-cpu   kernels  kernel sum, ms  run w/o profiler    speed-up: kernels /
                                           (paired), ms        timed w/o / timed with profiler
================  =======  ==============  ==================  ===================
fp32                   13           0.509               0.467  1.00 / 1.00 / 1.00
all-int8               18           0.329               0.240  1.55 / 2.02 / 1.37
checker0-int8          43           0.694               0.513  0.73 / 0.95 / 0.68
checker1-int8          37           0.622               0.468  0.82 / 1.01 / 0.75
================  =======  ==============  ==================  ===================

So ``enable_profiling`` itself changes the INT8/FP32 ratio (2.02x -> 1.37x): it adds a roughly constant
cost per kernel event (about 5-10 us here, more than a small kernel's own time), and the
``model_run`` / ``SequentialExecutor::Execute`` events of the profile carry that inflation too (same
ratios as the kernel sum, +15-25% dispatch). The TensorRT profile on digits shows the same per-kernel
effect (13 vs 51 kernels). On YOLOv5n (onnxruntime-cpu, kernels of milliseconds) the kernel-sum
ratios already match the unprofiled ones within a few percent (1.10 vs 1.13, 0.80 vs 0.82, 0.75 vs 0.76).
Hence the table stores kernel counts next to times (per layer and column, per Q/DQ tensor, the rest and
a rate per boundary, attributed exactly like the times), times every profiled configuration end to end
without the profiler, paired against FP32 in the same rounds, and fits by least squares
(:func:`fit_overhead`) ``end_to_end = kernel_scale x kernel_ms + ms_per_kernel x kernels + offset_ms``, or the
smaller nested model where leave-one-out error says the extra terms only fit noise;
a held-out configuration's kernel count is predicted from the same attribution. The scale absorbs the
load difference between the profiled and the timed rounds; on digits ORT-CPU the fit gives about
-5 us per kernel (the profiler's inflation minus real dispatch cost).

Context: ONNX Runtime's CPU profile runs an INT8 layer whose input crosses a precision boundary with another
kernel (QuantizeLinear + QLinearConv instead of an int8-in QLinearConv), so such a layer gets its own
``<precision>@entry`` column (:data:`ENTRY`, :func:`entry_layers`), measured by the checkerboards.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from sensisearch.errors import SensisearchError
from sensisearch.fileio import read_json, write_text_atomic
from sensisearch.latency._predictor import SOURCE_TABLE
from sensisearch.quantize.config import Precision, TrialConfig
from sensisearch.quantize.graph import GraphIndex, activation_epilogue

if TYPE_CHECKING:
    import onnx

    from sensisearch.model.analysis import ModelInfo
    from sensisearch.quantize.placement import Placement

TABLE_FORMAT = "sensisearch-latency-table"
TABLE_VERSION = 2


@dataclass(frozen=True)
class ConfigProfile:
    """One profiled configuration: per-node medians over runs, attributed (see ``_attribution``)."""

    name: str
    precisions: Mapping[str, str]
    layer_ms: Mapping[str, float]
    qdq_ms: Mapping[str, float]
    rest_ms: float
    """Kernels attributed to no layer and no Q/DQ tensor (layout nodes, non-layer ops)."""
    total_ms: float
    qdq_tensors: tuple[str, ...]
    """The placement's Q/DQ tensors of this configuration."""
    boundaries: int
    """:func:`boundary_count` of its placement."""
    boundary_set: tuple[str, ...] = ()
    """:func:`boundary_tensors` of its placement."""
    entry_layers: tuple[str, ...] = ()
    """:func:`entry_layers` of its placement (their times go to the ``<precision>@entry`` column)."""
    layer_kernels: Mapping[str, int] = field(default_factory=dict)
    """Profiled kernels per layer (what the backend runs for it at its precision)."""
    qdq_kernels: Mapping[str, int] = field(default_factory=dict)
    rest_kernels: int = 0
    end_to_end_ms: float | None = None
    """Its ``session.run`` time without the profiler, from paired interleaved timing against FP32
    (FP32's median in the same rounds / the paired speed-up); None when not timed."""

    @property
    def kernels(self) -> int:
        return sum(self.layer_kernels.values()) + sum(self.qdq_kernels.values()) + self.rest_kernels


def boundary_tensors(placement: Placement, model: onnx.ModelProto, index: GraphIndex | None = None) -> list[str]:
    """The placement's Q/DQ tensors where the precision changes (see the module docstring)."""
    index = index or GraphIndex(model)
    # The INT8 region's ops (Concat, Add, MaxPool, Resize, SiLU... under a region profile) produce 8-bit data too.
    produced_in_int8: set[str] = set(placement.region_outputs)
    for layer in placement.int8_layers:
        produced_in_int8.add(layer.output)
        epilogue = activation_epilogue(index, layer.output)
        if epilogue is not None:
            produced_in_int8.add(epilogue.output)
    return [
        qdq.tensor for qdq in placement.activations
        if qdq.tensor not in produced_in_int8 or "float_reader" in qdq.reasons
    ]


def boundary_count(placement: Placement, model: onnx.ModelProto, index: GraphIndex | None = None) -> int:
    return len(boundary_tensors(placement, model, index))


ENTRY = "@entry"
"""Suffix of a layer's column when it runs in a lower precision and its input crosses a precision boundary
(ONNX Runtime's CPU profile: such a layer runs a different kernel from the same layer inside an INT8 region)."""


def entry_layers(info: ModelInfo, precisions: Mapping[str, str], at_boundary: set[str]) -> list[str]:
    """The lower-precision layers whose activation input is a precision-boundary Q/DQ tensor."""
    return [
        layer.name for layer in info.layers
        if str(precisions[layer.name]) != Precision.FP32.value and layer.activation_input in at_boundary
    ]


def _column(costs: Mapping[str, float], precision: str, entered: bool) -> str | None:
    """The table column for a layer at ``precision``: its entry column when entered at a boundary, if measured."""
    for column in ((precision + ENTRY, precision) if entered else (precision, precision + ENTRY)):
        if column in costs:
            return column
    return None


def _qdq_sum(tensors: Sequence[str], at_boundary: set[str], boundary: Mapping[str, float], internal: Mapping[str, float]) -> float:
    """A placement's Q/DQ cost: per tensor, its boundary or internal figure (the other one if never seen so; else the median)."""
    default = statistics.median(boundary.values()) if boundary else 0.0
    return float(sum(
        boundary.get(t, internal.get(t, default)) if t in at_boundary else internal.get(t, boundary.get(t, default))
        for t in tensors
    ))


@dataclass
class LatencyTable:
    """Per-layer latency of one model under one quantization profile on one backend/device (a :class:`LatencyPredictor`)."""

    model: str
    """Path of the FP32 ONNX it was measured for (used to plan placements when not bound)."""
    model_sha256: str
    profile: str
    """Quantization profile name (``tensorrt``, ``onnxruntime-cpu``)."""
    backend: str
    device: str
    layers: dict[str, dict[str, float]]
    """Layer node name -> column -> ms; columns: a precision value, or ``<precision>@entry`` (:data:`ENTRY`)."""
    boundaries: dict[str, float]
    """Activation tensor -> ms of its standalone Q/DQ kernels where it is a precision boundary."""
    internal_qdq: dict[str, float]
    """Activation tensor -> ms of its Q/DQ kernels inside an INT8 region (ONNX Runtime's CPU profile fuses
    most of them into the integer kernels: near 0; TensorRT's profile on ONNX Runtime: real kernels)."""
    rest_ms: float
    layout_ms_per_boundary: float
    unmapped_share: float
    """Share of the profiled kernel time attributed to no layer and no Q/DQ tensor (in the rest)."""
    layer_kernels: dict[str, dict[str, float]] = field(default_factory=dict)
    """Layer node name -> precision value -> kernels the backend runs for it (median over the profiles)."""
    boundary_kernels: dict[str, float] = field(default_factory=dict)
    internal_kernels: dict[str, float] = field(default_factory=dict)
    rest_kernels: float = 0.0
    kernels_per_boundary: float = 0.0
    kernel_scale: float = 1.0
    """End-to-end anchor (:func:`fit_overhead`): ``session.run`` time without the profiler =
    kernel_scale x kernel ms + ms_per_kernel x kernels + offset_ms."""
    ms_per_kernel: float = 0.0
    """Negative when the profiler inflates each kernel event more than a kernel's dispatch costs (ONNX Runtime, CPU)."""
    offset_ms: float = 0.0
    configs: list[dict[str, Any]] = field(default_factory=list)
    """What was profiled: name, measured total and the table's prediction for it (ms)."""
    repeats: int = 0
    batch: int = 1
    threads: int | None = None
    """Threads per session that the kernels were profiled and the anchor timed at (ONNX Runtime: the timing
    sessions'); None for TensorRT and for tables written before it was recorded. A kernel's INT8 gain changes
    with the thread count, so a table predicts timings taken at its own count."""
    source: str = SOURCE_TABLE
    unit: str = "ms"
    _bound: Any = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        threads = "" if self.threads is None else f", {self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"predicted from latency table ({self.backend} on {self.device}{threads}, profile {self.profile})"

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    # ------------------------------------------------------------------ binding to the model
    def check_matches(self, model_sha256: str, layer_names: Sequence[str]) -> None:
        """Refuse a table made for another model (one line)."""
        if model_sha256 != self.model_sha256:
            raise SensisearchError(
                f"latency table for {self.model} (sha256 {self.model_sha256[:12]}) does not match this model "
                f"(sha256 {model_sha256[:12]}); run `sensisearch latency-table` for this model"
            )
        if list(layer_names) != self.layer_names:
            raise SensisearchError(
                f"latency table for {self.model}: its layers differ from this model's; run `sensisearch latency-table` again"
            )

    def bind(self, model: onnx.ModelProto, info: ModelInfo) -> LatencyTable:
        """Plan placements on ``model`` (checked against the table); returns self."""
        from sensisearch.quantize.profiles import PROFILES

        self.check_matches(info.sha256, info.layer_names)
        if self.profile not in PROFILES:
            raise SensisearchError(f"latency table for {self.model}: unknown quantization profile {self.profile!r}")
        self._bound = (model, info, GraphIndex(model), PROFILES[self.profile], {})
        return self

    def _ensure_bound(self) -> tuple[Any, ...]:
        if self._bound is None:
            from sensisearch.model.analysis import analyze_model

            if not Path(self.model).is_file():
                raise SensisearchError(
                    f"latency table: its model {self.model} is not here; bind the table to the model (LatencyTable.bind)"
                )
            info, model = analyze_model(Path(self.model))
            self.bind(model, info)
        return self._bound

    # ------------------------------------------------------------------ prediction
    def parts(self, precisions: Mapping[str, Precision | str]) -> dict[str, float]:
        """The prediction split into ``layers``, ``qdq``, ``layout``, ``rest`` and ``overhead`` (ms), plus the predicted ``kernels`` count."""
        model, info, index, profile, memo = self._ensure_bound()
        key = tuple(Precision(precisions[name]).value for name in self.layers)
        if key in memo:
            return memo[key]
        from sensisearch.quantize.placement import plan_placement

        placement = plan_placement(info, model, TrialConfig({n: Precision(p) for n, p in zip(self.layers, key)}), profile, index)
        at_boundary = set(boundary_tensors(placement, model, index))
        entered = set(entry_layers(info, dict(zip(self.layers, key)), at_boundary))
        layer_ms = 0.0
        layer_kernels = 0.0
        for name, precision in zip(self.layers, key):
            costs = self.layers[name]
            column = _column(costs, precision, name in entered)
            if column is None:
                raise SensisearchError(
                    f"latency table for {self.model} has no {precision} time for layer {name!r}; "
                    f"measure it with --precisions including {precision}"
                )
            layer_ms += costs[column]
            layer_kernels += self.layer_kernels.get(name, {}).get(column, 0.0)
        qdq_ms = _qdq_sum(placement.tensors, at_boundary, self.boundaries, self.internal_qdq)
        qdq_kernels = _qdq_sum(placement.tensors, at_boundary, self.boundary_kernels, self.internal_kernels)
        layout_ms = self.layout_ms_per_boundary * len(at_boundary)
        kernels = layer_kernels + qdq_kernels + self.rest_kernels + self.kernels_per_boundary * len(at_boundary)
        memo[key] = {
            "layers": layer_ms, "qdq": qdq_ms, "layout": layout_ms, "rest": self.rest_ms,
            "overhead": (self.kernel_scale - 1.0) * (layer_ms + qdq_ms + layout_ms + self.rest_ms)
            + self.ms_per_kernel * kernels + self.offset_ms,
            "kernels": kernels,
        }
        return memo[key]

    def predict(self, precisions: Mapping[str, Precision | str]) -> float:
        """End-to-end ms: the attributed kernel time plus the fitted per-kernel overhead (``parts`` minus its kernel count)."""
        parts = self.parts(precisions)
        return float(sum(v for k, v in parts.items() if k != "kernels"))

    def kernel_ms(self, precisions: Mapping[str, Precision | str]) -> float:
        """The profiled kernel time alone (what the profiler sums; no end-to-end anchor)."""
        parts = self.parts(precisions)
        return float(parts["layers"] + parts["qdq"] + parts["layout"] + parts["rest"])

    def speedup(self, precisions: Mapping[str, Precision | str]) -> float:
        fp32 = self.predict({name: Precision.FP32 for name in self.layers})
        return fp32 / max(self.predict(precisions), 1e-12)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k not in ("source", "unit")}
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "unit": self.unit, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        names = [f for f in cls.__dataclass_fields__ if not f.startswith("_") and f not in ("source", "unit")]
        return cls(**{name: data[name] for name in names if name in data})

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1))


REQUIRED_KEYS = (
    "model", "model_sha256", "profile", "backend", "device", "layers", "boundaries", "internal_qdq", "rest_ms", "layout_ms_per_boundary",
    "layer_kernels", "boundary_kernels", "internal_kernels", "rest_kernels", "kernels_per_boundary", "kernel_scale", "ms_per_kernel", "offset_ms",
)


def load_latency_table(path: Path | str) -> LatencyTable:
    """Read a table written by ``sensisearch latency-table``; one-line :class:`SensisearchError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise SensisearchError(f"latency table {path} does not exist; make it with `sensisearch latency-table --out {path}`")
    data = read_json(path, f"latency table {path}", "make it with `sensisearch latency-table`")
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise SensisearchError(f"latency table {path} is not a sensisearch latency table; make it with `sensisearch latency-table`")
    if data.get("version") != TABLE_VERSION:
        raise SensisearchError(
            f"latency table {path} has format version {data.get('version')!r}, this sensisearch reads {TABLE_VERSION}; "
            "measure it again with this version"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise SensisearchError(f"latency table {path} lacks {', '.join(missing)}; measure it again")
    return LatencyTable.from_dict(data)


# ---------------------------------------------------------------------- fitting (pure)
def fit_overhead(kernel_ms: Sequence[float], kernels: Sequence[float], end_to_end_ms: Sequence[float]) -> tuple[float, float, float]:
    """``(kernel_scale, ms_per_kernel, offset_ms)`` of ``end_to_end = kernel_scale x kernel_ms + ms_per_kernel x kernels + offset_ms``.

    Three nested models are fitted by least squares: the scale alone, scale + offset, and all three. The one with
    the smallest leave-one-out relative error is kept; a larger model must beat the smaller by 10%. Why: the table
    is fitted on six profiled configurations whose kernel counts follow their kernel times closely, so on a loaded
    machine the three-term fit can cancel its terms and predict a held-out configuration 40% off while the scale
    alone (the profiler's kernel ratio) is within 1%. A model is only a candidate with two more configurations
    than unknowns; fewer than three configurations get the scale alone (ratio of the sums).
    """
    kernel_ms, kernels, end_to_end = (np.asarray(x, dtype=float) for x in (kernel_ms, kernels, end_to_end_ms))
    if kernel_ms.size == 0 or kernel_ms.sum() <= 0:
        return 1.0, 0.0, 0.0
    ones = np.ones_like(kernel_ms)
    candidates = [(0,), (0, 2)] + ([(0, 1, 2)] if len(set(kernels.tolist())) > 1 else [])
    columns = np.stack([kernel_ms, kernels, ones], axis=1)
    best, best_error = np.array([end_to_end.sum() / kernel_ms.sum(), 0.0, 0.0]), np.inf
    for used in candidates:
        if kernel_ms.size < len(used) + 2:
            continue
        error = _leave_one_out_error(columns[:, used], end_to_end)
        if error < 0.9 * best_error:
            coefficients = np.zeros(3)
            coefficients[list(used)] = np.linalg.lstsq(columns[:, used], end_to_end, rcond=None)[0]
            best, best_error = coefficients, error
    return float(best[0]), float(best[1]), float(best[2])


def _leave_one_out_error(design: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared relative error of each point predicted by the least-squares fit of the others."""
    errors = []
    for i in range(target.size):
        keep = np.arange(target.size) != i
        coefficients = np.linalg.lstsq(design[keep], target[keep], rcond=None)[0]
        errors.append((design[i] @ coefficients - target[i]) / max(abs(target[i]), 1e-12))
    return float(np.sqrt(np.mean(np.square(errors))))


def _per_layer(profiles: Sequence[ConfigProfile], layer_names: Sequence[str], values: str) -> dict[str, dict[str, float]]:
    """Median of ``profile.<values>[layer]`` per layer and column (precision, or precision entered at a boundary)."""
    out: dict[str, dict[str, float]] = {}
    for name in layer_names:
        by_precision: dict[str, list[float]] = {}
        for p in profiles:
            column = str(p.precisions[name]) + (ENTRY if name in p.entry_layers else "")
            by_precision.setdefault(column, []).append(float(getattr(p, values).get(name, 0.0)))
        out[name] = {prec: float(np.median(v)) for prec, v in sorted(by_precision.items())}
    return out


def _per_tensor(profiles: Sequence[ConfigProfile], values: str) -> tuple[dict[str, float], dict[str, float]]:
    """Mean of ``profile.<values>[tensor]`` per Q/DQ tensor: (at a precision boundary, inside an INT8 region)."""
    seen: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}
    for p in profiles:
        for tensor in p.qdq_tensors:
            (seen if tensor in p.boundary_set else inside).setdefault(tensor, []).append(float(getattr(p, values).get(tensor, 0.0)))
    return {t: float(np.mean(v)) for t, v in seen.items()}, {t: float(np.mean(v)) for t, v in inside.items()}


def _rest_and_rate(rests: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Configuration-independent rest and its rate per precision boundary (least squares)."""
    if len(set(counts.tolist())) > 1:
        design = np.stack([np.ones_like(counts), counts], axis=1)
        (rest, per_boundary), *_ = np.linalg.lstsq(design, rests, rcond=None)
        return float(rest), float(per_boundary)
    return float(np.median(rests)), 0.0


def fit_table(
    profiles: Sequence[ConfigProfile],
    layer_names: Sequence[str],
    **identity: Any,
) -> LatencyTable:
    """A table from attributed profiles: medians per layer and precision, mean Q/DQ cost per tensor, fitted rest,
    the same for kernel counts, and the end-to-end anchor (:func:`fit_overhead`) over the profiles timed end to end.

    ``identity``: model, model_sha256, profile, backend, device, repeats, batch, threads.
    """
    if not profiles:
        raise ValueError("no profiled configurations")
    layers = _per_layer(profiles, layer_names, "layer_ms")
    layer_kernels = _per_layer(profiles, layer_names, "layer_kernels")
    boundaries, internal_qdq = _per_tensor(profiles, "qdq_ms")
    boundary_kernels, internal_kernels = _per_tensor(profiles, "qdq_kernels")
    counts = np.array([p.boundaries for p in profiles], dtype=float)
    # Q/DQ kernels on tensors outside the placement (none expected) stay in the rest.
    rests = np.array([p.rest_ms + sum(v for t, v in p.qdq_ms.items() if t not in p.qdq_tensors) for p in profiles])
    rest_ms, per_boundary = _rest_and_rate(rests, counts)
    rest_kernel_counts = np.array([p.rest_kernels + sum(v for t, v in p.qdq_kernels.items() if t not in p.qdq_tensors) for p in profiles], dtype=float)
    rest_kernels, kernels_per_boundary = _rest_and_rate(rest_kernel_counts, counts)
    timed = [p for p in profiles if p.end_to_end_ms is not None]
    kernel_scale, ms_per_kernel, offset_ms = fit_overhead(
        [p.total_ms for p in timed], [p.kernels for p in timed], [float(p.end_to_end_ms) for p in timed]  # type: ignore[arg-type]
    )
    total = sum(p.total_ms for p in profiles)
    unmapped = sum(p.rest_ms for p in profiles) / total if total > 0 else 0.0
    table = LatencyTable(
        layers=layers, boundaries=boundaries, internal_qdq=internal_qdq, rest_ms=rest_ms, layout_ms_per_boundary=per_boundary,
        unmapped_share=float(unmapped), layer_kernels=layer_kernels, boundary_kernels=boundary_kernels,
        internal_kernels=internal_kernels, rest_kernels=rest_kernels, kernels_per_boundary=kernels_per_boundary,
        kernel_scale=kernel_scale, ms_per_kernel=ms_per_kernel, offset_ms=offset_ms, **identity,
    )
    table.configs = [
        {"name": p.name, "measured_ms": p.total_ms, "kernels": p.kernels, "end_to_end_ms": p.end_to_end_ms, "boundaries": p.boundaries}
        for p in profiles
    ]
    return table
