"""A benchmark of the project's models that needs only Keras 3 + NumPy: the same numbers on any Keras back-end.

Why: a GPU machine may offer JAX (or PyTorch) without TensorFlow. This module imports `keras` and
`numpy` only (each back-end's own package is imported lazily, inside the branch for that back-end),
builds the models through `models.registry`, and trains them with Keras' own compiled train step
(`Model.compile(jit_compile=...)` + `train_on_batch`), so the step is XLA-compiled on TensorFlow and
`jax.jit`-compiled on JAX. Inputs and targets are synthetic tensors of the model's shapes: this
measures the device, not the input pipeline (the engine's records measure that).

Numbers: step time = wall time of one `train_on_batch` call (it returns host values, so the device
has finished); the first `warmup` calls (tracing, compilation, autotuning) are excluded; medians and
10th/90th percentiles over the measured calls. Achieved FLOP/s = training FLOPs per sample
(`models.flops`, 3 x forward) x samples/s; the device peak is measured with a jit-compiled square
matmul in the compute dtype of the precision (`matmul_peak_flops`), so the ratio (model FLOP
utilisation) compares like with like on this device.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np

from cellavie_hpc.train.environment import cpu_name

PRECISIONS = ("fp32", "tf32", "mixed_float16", "mixed_bfloat16")
#: Compute dtype of each precision (what the matmul peak probe multiplies in).
COMPUTE_DTYPE = {"fp32": "float32", "tf32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def backend() -> str:
    return keras.backend.backend()


def set_precision(precision: str) -> None:
    """The Keras dtype policy, and whether float32 matmuls may use TF32 tensor cores (NVIDIA Ampere and later).

    TensorFlow and JAX both allow TF32 by default on such GPUs, so `fp32` switches it off explicitly:
    `fp32` then means IEEE float32 everywhere and `tf32` is a separate, measured choice. No effect on CPUs.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    keras.config.set_dtype_policy(precision if precision.startswith("mixed") else "float32")
    allow_tf32 = precision == "tf32"
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
    elif name == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if allow_tf32 else "highest")
    elif name == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32


def device() -> dict[str, Any]:
    """`{kind, name, count, backend}` of the first accelerator the back-end sees (the CPU otherwise)."""
    name = backend()
    cpu = {"kind": "cpu", "name": cpu_name(), "count": 1, "backend": name}
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return {"kind": "gpu", "name": details.get("device_name", gpus[0].name), "count": len(gpus), "backend": name}
    elif name == "jax":
        import jax

        devices = jax.devices()
        if devices and devices[0].platform != "cpu":
            return {"kind": devices[0].platform, "name": devices[0].device_kind, "count": len(devices), "backend": name}
    elif name == "torch":
        import torch

        if torch.cuda.is_available():
            return {"kind": "gpu", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                    "backend": name}
    return cpu


def peak_memory() -> tuple[int, str]:
    """(peak bytes, source): the first accelerator's allocator peak, else this process's peak RSS."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), "device"
    elif name == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device"
    elif name == "torch":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated()), "device"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "rss"


def _compiled(fn: Callable) -> Callable:
    """`fn` compiled by the back-end's compiler (XLA through tf.function or jax.jit)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if name == "jax":
        import jax

        return jax.jit(fn)
    return fn


def matmul_peak_flops(dtype: str = "float32", n: int | None = None, repeats: int = 5, chain: int = 8) -> float:
    """Measured FLOP/s of `chain` square n x n matmuls per compiled call (best of `repeats`, after a warm-up).

    The best, not the median, because a peak is an upper bound: slower repeats measure interference.
    n defaults to 1024 on a CPU and 8192 on an accelerator (large enough to saturate either).
    """
    if n is None:
        n = 1024 if device()["kind"] == "cpu" else 8192
    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n), dtype=dtype)

    def run(x):
        for _ in range(chain):
            x = keras.ops.matmul(a, x)
        return keras.ops.sum(keras.ops.cast(x[:1, :1], "float32"))

    step = _compiled(run)
    float(keras.ops.convert_to_numpy(step(a)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(keras.ops.convert_to_numpy(step(a)))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 * chain / best


def synthetic_batch(spec, batch: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Inputs (normal) and targets (zeros for labels, uniform in [0, 1) otherwise) of `spec`'s shapes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.input_shape), dtype=np.float32)
    y = {}
    for key, shape in spec.targets.shapes.items():
        dtype = spec.targets.dtypes[key]
        y[key] = (np.zeros((batch, *shape), dtype) if dtype.startswith("int")
                  else rng.random((batch, *shape), dtype=np.float32))
    return x, y


class SpecTrainer(keras.Model):
    """The model with its spec's loss: Keras' own train step (any back-end) then minimises `spec.loss`."""

    def __init__(self, model: keras.Model, loss: Callable):
        super().__init__(name=f"{model.name}_trainer")
        self.net = model
        self.spec_loss = loss

    def call(self, x, training: bool = False):
        return self.net(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = keras.ops.cast(self.spec_loss(y, y_pred), "float32")
        for extra in self.losses:
            total = total + keras.ops.cast(extra, "float32")
        return total


@dataclasses.dataclass(frozen=True)
class PortableResult:
    """One measured configuration (times in s, rates per s, memory in bytes)."""

    model: str
    preset: str
    patch: int
    batch: int
    precision: str
    jit: bool
    backend: str
    device: str
    steps: int
    step_time_median_s: float
    step_time_p10_s: float
    step_time_p90_s: float
    samples_per_s: float
    train_flops_per_sample: int
    achieved_flops_per_s: float
    peak_flops_per_s: float | None
    mem_peak_bytes: int
    mem_source: str

    @property
    def mfu(self) -> float | None:
        """Achieved / measured peak FLOP/s (model FLOP utilisation)."""
        return self.achieved_flops_per_s / self.peak_flops_per_s if self.peak_flops_per_s else None


def build_trainer(model: str, preset: str, patch: int, batch: int, precision: str, jit: bool,
                  learning_rate: float = 1e-3):
    """(trainer, x, y): the compiled model and one synthetic batch; the dtype policy is set first."""
    from cellavie_hpc.models.registry import DEFAULT_CHANNELS, build_model, model_spec

    set_precision(precision)
    channels = DEFAULT_CHANNELS[model]
    spec = model_spec(model, preset, patch, channels)
    net = build_model(model, preset, patch, channels)
    trainer = SpecTrainer(net, spec.loss)
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit)
    x, y = synthetic_batch(spec, batch)
    return trainer, net, x, y


def measure(model: str = "unet", preset: str = "tiny", patch: int = 64, batch: int = 8, precision: str = "fp32",
            jit: bool = True, steps: int = 20, warmup: int = 3, peak_flops_per_s: float | None = None
            ) -> PortableResult:
    """Train `steps` + `warmup` steps on one synthetic batch; time each step; see the module docstring."""
    from cellavie_hpc.models.flops import training_flops_per_sample

    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1 (compilation), got {steps}, {warmup}")
    trainer, net, x, y = build_trainer(model, preset, patch, batch, precision, jit)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = trainer.train_on_batch(x, y)
        if not np.isfinite(np.asarray(loss)).all() and precision != "mixed_float16":
            raise FloatingPointError(f"{model}: loss became {loss} at step {i}")
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    q = np.percentile(times, [10, 90])
    fps = training_flops_per_sample(net)
    mem, source = peak_memory()
    return PortableResult(
        model=model, preset=preset, patch=patch, batch=batch, precision=precision, jit=jit, backend=backend(),
        device=device()["name"], steps=steps, step_time_median_s=median, step_time_p10_s=float(q[0]),
        step_time_p90_s=float(q[1]), samples_per_s=batch / median, train_flops_per_sample=fps,
        achieved_flops_per_s=fps * batch / median, peak_flops_per_s=peak_flops_per_s, mem_peak_bytes=mem,
        mem_source=source)


def run_table(models: Sequence[str], patches: Sequence[int], batches: Sequence[int], precisions: Sequence[str],
              preset: str = "tiny", jit: bool = True, steps: int = 20, warmup: int = 3) -> list[PortableResult]:
    """Every model x precision x patch x batch, each with the matmul peak of its compute dtype (probed once)."""
    peaks: dict[str, float] = {}
    results = []
    for precision in precisions:
        dtype = COMPUTE_DTYPE[precision]
        if dtype not in peaks:
            set_precision(precision)
            peaks[dtype] = matmul_peak_flops(dtype)
        for name in models:
            for patch in patches:
                for batch in batches:
                    results.append(measure(name, preset, patch, batch, precision, jit, steps, warmup, peaks[dtype]))
    return results


def format_table(results: Sequence[PortableResult]) -> str:
    lines = [("backend", "model", "patch", "batch", "precision", "jit", "samples/s", "step ms", "p10-p90 ms",
              "GFLOP/s", "peak GFLOP/s", "MFU %", "mem MiB")]
    for r in results:
        lines.append((r.backend, r.model, str(r.patch), str(r.batch), r.precision, "yes" if r.jit else "no",
                      f"{r.samples_per_s:.1f}", f"{1e3 * r.step_time_median_s:.1f}",
                      f"{1e3 * r.step_time_p10_s:.1f}-{1e3 * r.step_time_p90_s:.1f}",
                      f"{r.achieved_flops_per_s / 1e9:.2f}", f"{(r.peak_flops_per_s or 0) / 1e9:.1f}",
                      f"{100 * r.mfu:.1f}" if r.mfu is not None else "-",
                      f"{r.mem_peak_bytes / 2**20:.0f} ({r.mem_source})"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
