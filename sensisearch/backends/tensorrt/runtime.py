"""GPU-only engine runner: deserialize, bind I/O, execute_async_v3, time with CUDA events.

Nothing here can run without an NVIDIA GPU, so it is kept thin: plain,
documented TensorRT and cuda-python calls (``cuda.bindings.runtime``; pycuda
only when cuda-python is missing) with no logic of their own. The testable
pieces (batch chunking, latency statistics) live in pure functions.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any, Callable, Mapping

import numpy as np

from sensisearch.backends.base import LatencySettings, LatencyStats, Runner
from sensisearch.backends.tensorrt.flavor import TensorRTFlavor
from sensisearch.backends.tensorrt.network import capturing_logger
from sensisearch.errors import SensisearchError
from sensisearch.model.tensor import TensorSpec


def batch_chunks(n: int, max_batch: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` splitting ``n`` rows into pieces of at most ``max_batch``."""
    if not max_batch or n <= max_batch:
        return [(0, n)]
    return [(s, min(s + max_batch, n)) for s in range(0, n, max_batch)]


def enough_samples(samples: int, elapsed_s: float, settings: LatencySettings) -> bool:
    """Stop timing once both ``min_runs`` and ``min_seconds`` are reached, or at ``max_runs``."""
    return samples >= settings.max_runs or (samples >= settings.min_runs and elapsed_s >= settings.min_seconds)


# --------------------------------------------------------------------------- CUDA bindings


class _CudaPython:
    """The few cuda-python runtime calls the runner needs (every call returns ``(err, ...)``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python < 12.6 kept the old module path (removed in 13.0)
            from cuda import cudart  # type: ignore[no-redef]
        self.rt = cudart

    def _check(self, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise SensisearchError(f"CUDA error {getattr(err, 'name', err)}; check the driver and that the GPU is free")
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else result[1:]
        return None

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def destroy_stream(self, stream: Any) -> None:
        self.rt.cudaStreamDestroy(stream)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def sync(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def event(self) -> Any:
        return self._check(self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self._check(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._check(self.rt.cudaEventSynchronize(end))
        return float(self._check(self.rt.cudaEventElapsedTime(start, end)))

    def destroy_event(self, event: Any) -> None:
        self.rt.cudaEventDestroy(event)


class _PyCuda:
    """pycuda equivalents, used only when cuda-python is not installed."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401 - creates the context
        import pycuda.driver as cuda

        self.cuda = cuda
        self._allocs: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(max(1, nbytes))
        self._allocs[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        mem = self._allocs.pop(ptr, None)
        if mem is not None:
            mem.free()

    def stream(self) -> Any:
        return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def destroy_stream(self, stream: Any) -> None:
        pass

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def event(self) -> Any:
        return self.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.time_till(end))

    def destroy_event(self, event: Any) -> None:
        pass


def cuda_bindings() -> Any:
    """cuda-python if it imports, else pycuda; a one-line error when neither does."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _PyCuda()
    except ImportError:
        raise SensisearchError("no CUDA Python bindings: pip install cuda-python (or pycuda)") from None


def parse_gpu_state(clocks_csv: str, apps_csv: str) -> dict[str, Any]:
    """``nvidia-smi`` CSV (``--query-gpu=clocks.sm,clocks.mem,clocks.max.sm`` and
    ``--query-compute-apps=pid,process_name,used_memory``, noheader, nounits) as a dict."""
    gpus = []
    for line in clocks_csv.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) >= 3:
            gpus.append({"sm_mhz": values[0], "mem_mhz": values[1], "max_sm_mhz": values[2]})
    apps = []
    for line in apps_csv.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) >= 2:
            apps.append({"pid": values[0], "name": values[1], "used_mib": values[2] if len(values) > 2 else None})
    return {"gpus": gpus, "compute_processes": apps}


def gpu_state() -> dict[str, Any]:
    """GPU clocks and the compute processes on the GPU, from nvidia-smi; empty where it is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    common = ["--format=csv,noheader,nounits"]
    try:
        clocks = subprocess.run([smi, "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm", *common], capture_output=True, text=True, timeout=10)
        apps = subprocess.run([smi, "--query-compute-apps=pid,process_name,used_memory", *common], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_gpu_state(clocks.stdout, apps.stdout)


# --------------------------------------------------------------------------- engine


def deserialize(flavor: TensorRTFlavor, plan: bytes, where: str = "plan") -> tuple[Any, Any]:
    """``(runtime, engine)``; a one-line error when TensorRT refuses the plan."""
    trt = flavor.module
    logger = capturing_logger(trt)
    mark = logger.mark()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        why = logger.last_error(mark) or "no error message"
        raise SensisearchError(
            f"{where}: {flavor.module_name} {flavor.version} could not deserialize the engine ({why}); check the GPU and "
            "driver (sensisearch doctor), or rebuild the plan on this machine with sensisearch build"
        )
    return runtime, engine


def inspect_engine(engine: Any, context: Any, flavor: TensorRTFlavor) -> str:
    """Engine-inspector JSON (DETAILED plans); ``context`` has its input shapes set so
    dynamic dimensions show concrete formats."""
    trt = flavor.module
    inspector = engine.create_engine_inspector()
    if context is not None:
        inspector.execution_context = context
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


class TensorRTRunner(Runner):
    """Runs one deserialized engine on the GPU (one execution context per stream)."""

    def __init__(self, flavor: TensorRTFlavor, plan: bytes, where: str = "plan", streams: int = 1) -> None:
        trt = flavor.module
        self.flavor = flavor
        self.cuda = cuda_bindings()
        self.runtime, self.engine = deserialize(flavor, plan, where)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.names}
        self.contexts = []
        self.streams = []
        for k in range(max(1, streams)):
            ctx = self.engine.create_execution_context()
            stream = self.cuda.stream()
            if k and self.engine.num_optimization_profiles > k:
                ctx.set_optimization_profile_async(k, self.cuda.stream_handle(stream))
            self.contexts.append(ctx)
            self.streams.append(stream)
        self._buffers: list[dict[str, tuple[int, int]]] = [{} for _ in self.contexts]
        self._events: list[Any] = []

    # ---------------------------------------------------------------- specs
    def _spec(self, name: str) -> TensorSpec:
        shape = tuple(int(d) if int(d) >= 0 else None for d in self.engine.get_tensor_shape(name))
        return TensorSpec(name, shape, self.dtypes[name])

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self._spec(n) for n in self.input_names]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [self._spec(n) for n in self.output_names]

    @property
    def max_batch(self) -> int | None:
        """Largest batch profile 0 accepts (None for static-batch engines)."""
        name = self.input_names[0]
        if int(self.engine.get_tensor_shape(name)[0]) >= 0:
            return None
        return int(self.engine.get_tensor_profile_shape(name, 0)[2][0])

    # ---------------------------------------------------------------- execution
    def _buffer(self, k: int, name: str, nbytes: int) -> int:
        ptr, size = self._buffers[k].get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[k][name] = (ptr, size)
        return ptr

    def _enqueue(self, k: int, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Copy inputs, set shapes and addresses, execute_async_v3, copy outputs (not synchronized)."""
        ctx, stream = self.contexts[k], self.streams[k]
        for name in self.input_names:
            x = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            ctx.set_input_shape(name, x.shape)
            ptr = self._buffer(k, name, x.nbytes)
            self.cuda.h2d(ptr, x, stream)
            ctx.set_tensor_address(name, ptr)
        outs = []
        for name in self.output_names:
            y = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name])
            ctx.set_tensor_address(name, self._buffer(k, name, y.nbytes))
            outs.append(y)
        if not ctx.execute_async_v3(self.cuda.stream_handle(stream)):
            raise SensisearchError("TensorRT execute_async_v3 failed; check input shapes against the optimization profile")
        for name, y in zip(self.output_names, outs):
            self.cuda.d2h(y, self._buffers[k][name][0], stream)
        return outs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        pieces: list[list[np.ndarray]] = []
        for start, stop in batch_chunks(n, self.max_batch):
            outs = self._enqueue(0, {k: v[start:stop] for k, v in feeds.items()})
            self.cuda.sync(self.streams[0])
            pieces.append(outs)
        if len(pieces) == 1:
            return pieces[0]
        return [np.concatenate([p[i] for p in pieces]) for i in range(len(self.output_names))]

    def _execute_only(self, k: int) -> None:
        ctx = self.contexts[k]
        ctx.execute_async_v3(self.cuda.stream_handle(self.streams[k]))

    def measure_latency(self, feeds: Mapping[str, np.ndarray], settings: LatencySettings) -> LatencyStats:
        """Warm-up (on RTX this includes JIT compilation), then one CUDA-event pair per run."""
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        self._enqueue(0, feeds)  # inputs on the device once; timing covers execution only
        self.cuda.sync(self.streams[0])
        stream = self.streams[0]
        for _ in range(settings.warmup_runs):
            self._execute_only(0)
        self.cuda.sync(stream)
        start_ev, end_ev = self.cuda.event(), self.cuda.event()
        samples: list[float] = []
        t0 = time.perf_counter()
        try:
            while not enough_samples(len(samples), time.perf_counter() - t0, settings):
                self.cuda.record(start_ev, stream)
                self._execute_only(0)
                self.cuda.record(end_ev, stream)
                samples.append(self.cuda.elapsed_ms(start_ev, end_ev))
        finally:
            self.cuda.destroy_event(start_ev)
            self.cuda.destroy_event(end_ev)
        return LatencyStats.from_samples(samples, batch)

    def timing_arm(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """One execute_async_v3 on inputs already on the device, timed by a CUDA-event pair (returns ms)."""
        self._enqueue(0, feeds)
        stream = self.streams[0]
        self.cuda.sync(stream)
        start_ev, end_ev = self.cuda.event(), self.cuda.event()
        self._events += [start_ev, end_ev]

        def run_once() -> float:
            self.cuda.record(start_ev, stream)
            self._execute_only(0)
            self.cuda.record(end_ev, stream)
            return self.cuda.elapsed_ms(start_ev, end_ev)

        return run_once

    def throughput_arm(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        """One execute per execution context, all streams busy at once; host-timed up to the last sync."""
        for k in range(len(self.contexts)):
            self._enqueue(k, feeds)
        for s in self.streams:
            self.cuda.sync(s)

        def run_all() -> None:
            for k in range(len(self.contexts)):
                self._execute_only(k)
            for s in self.streams:
                self.cuda.sync(s)

        return run_all

    def timing_facts(self) -> dict[str, Any]:
        return gpu_state()

    def measure_throughput(self, feeds: Mapping[str, np.ndarray], seconds: float = 2.0, warmup_runs: int = 10) -> dict[str, Any]:
        """Images per second with every stream/context busy (build with ``profiles=streams``
        for dynamic shapes so each context has its own optimization profile)."""
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        for k in range(len(self.contexts)):
            self._enqueue(k, feeds)
        for _ in range(warmup_runs):
            for k in range(len(self.contexts)):
                self._execute_only(k)
        for s in self.streams:
            self.cuda.sync(s)
        runs = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for k in range(len(self.contexts)):
                self._execute_only(k)
            runs += len(self.contexts)
            if runs % (8 * len(self.contexts)) == 0:
                self.cuda.sync(self.streams[0])
        for s in self.streams:
            self.cuda.sync(s)
        elapsed = time.perf_counter() - t0
        return {"streams": len(self.contexts), "batch_size": batch, "runs": runs, "seconds": elapsed, "images_per_second": runs * batch / elapsed}

    def inspect(self, feeds: Mapping[str, np.ndarray] | None = None) -> str:
        """Engine-inspector JSON, with input shapes set from ``feeds`` (or profile 0's opt shapes)."""
        ctx = self.contexts[0]
        for name in self.input_names:
            shape = feeds[name].shape if feeds else tuple(self.engine.get_tensor_profile_shape(name, 0)[1])
            if int(self.engine.get_tensor_shape(name)[0]) < 0 or feeds:
                ctx.set_input_shape(name, shape)
        return inspect_engine(self.engine, ctx, self.flavor)

    def close(self) -> None:
        for event in self._events:
            self.cuda.destroy_event(event)
        self._events = []
        for bufs in self._buffers:
            for ptr, _ in bufs.values():
                self.cuda.free(ptr)
            bufs.clear()
        for s in self.streams:
            self.cuda.destroy_stream(s)
        self.streams = []
        self.contexts = []
        self.engine = None
        self.runtime = None

