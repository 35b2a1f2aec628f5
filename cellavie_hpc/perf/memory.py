"""The largest batch that fits, per model and patch size: doubling, then bisection, one fresh process per trial.

Why a process per trial: a real out-of-memory (the kernel's OOM killer, a CUDA allocator abort) must
not kill the search, and a trial's peak must not inherit the previous trial's. A trial trains a few
steps on synthetic tensors of the model's shapes (memory does not depend on the values) and reports
its peak. It does *not fit* when

* the allocator raises (`tf.errors.ResourceExhaustedError`, `MemoryError`, an XLA/JAX "RESOURCE_EXHAUSTED"),
* the process is killed by a signal (the OOM killer's SIGKILL), or
* the peak exceeds the memory budget in bytes: on a CPU the resident set size (default budget: half
  the machine's memory), watched every 5 ms by a thread that ends the trial as soon as it crosses the
  budget (so the machine never actually runs out); on a GPU the allocator's peak (default: the
  device's own limit). The CPU peak includes the runtime itself (`baseline_bytes`, measured before
  the model is built), which the table shows separately.

Any other failure is an error, not "does not fit": a broken model must not pass for a full device.
Trials run through the training engine's own step (`train.loop.build_step`, TensorFlow) or, with
`runner="portable"`, through `perf.portable` on whatever Keras back-end is installed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

EXIT_OVER_BUDGET = 3
EXIT_EXHAUSTED = 4
RUNNERS = ("engine", "portable")


@dataclasses.dataclass(frozen=True)
class Trial:
    batch: int
    fits: bool
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    source: str | None = None
    reason: str = ""
    wall_s: float | None = None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    largest: int                 # 0: not even `start` fits... down to batch 1
    trials: tuple[Trial, ...]
    limit_reached: bool          # `limit` itself fits: the true largest may be larger


def largest_batch(try_batch: Callable[[int], Trial | bool], start: int = 1, limit: int = 4096) -> SearchResult:
    """Largest batch in [1, limit] for which `try_batch` fits, assuming fitting is monotone in the batch.

    Doubles from `start` until a batch fails (or `limit`), then bisects between the last fitting and the
    first failing batch: about 2 log2(largest) trials. Each batch is tried at most once.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    trials: dict[int, Trial] = {}

    def fits(batch: int) -> bool:
        if batch not in trials:
            result = try_batch(batch)
            trials[batch] = result if isinstance(result, Trial) else Trial(batch, bool(result))
        return trials[batch].fits

    good, bad = 0, None
    batch = start
    while True:
        if fits(batch):
            good = batch
            if batch == limit:
                break
            batch = min(2 * batch, limit)
        else:
            bad = batch
            break
    if bad is not None:
        while bad - good > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    ordered = tuple(trials[b] for b in trials)
    return SearchResult(good, ordered, limit_reached=bad is None)


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    model: str = "unet"
    preset: str = "tiny"
    patch: int = 64
    precision: str = "fp32"
    xla: bool = False
    steps: int = 2
    budget_bytes: int | None = None   # None: half the machine's memory on a CPU, the device's limit on a GPU
    runner: str = "engine"

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise ValueError(f"budget_bytes must be a positive number of bytes, got {self.budget_bytes}")


def run_trial(spec: TrialSpec, batch: int, timeout_s: float = 900, env: dict[str, str] | None = None) -> Trial:
    """One trial in a fresh process (see the module docstring for what counts as not fitting)."""
    command = [sys.executable, "-m", "cellavie_hpc.perf.memory", json.dumps(dataclasses.asdict(spec)), str(batch)]
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **(env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"memory trial {spec.model} patch {spec.patch} batch {batch} did not finish in "
                           f"{timeout_s:.0f} s; raise the timeout or lower the search limit") from err
    wall = time.perf_counter() - start
    report = _last_json(proc.stdout)
    peak = report.get("peak_bytes")
    common = {"peak_bytes": peak, "baseline_bytes": report.get("baseline_bytes"), "source": report.get("source"),
              "wall_s": wall}
    if proc.returncode == 0:
        return Trial(batch, True, reason="fits", **common)
    if proc.returncode == EXIT_OVER_BUDGET:
        return Trial(batch, False, reason=f"over the memory budget ({spec.budget_bytes or 'half the RAM'} bytes)",
                     **common)
    if proc.returncode == EXIT_EXHAUSTED:
        return Trial(batch, False, reason=f"out of memory: {report.get('error', '')[:200]}", **common)
    if proc.returncode < 0:
        return Trial(batch, False, reason=f"killed by {signal.Signals(-proc.returncode).name} (out of memory?)",
                     **common)
    raise RuntimeError(f"memory trial {spec.model} patch {spec.patch} batch {batch} failed (exit "
                       f"{proc.returncode}), which is not an out-of-memory:\n{proc.stderr.strip()[-2000:]}")


def search(spec: TrialSpec, start: int = 1, limit: int = 1024, progress: bool = True,
           trial: Callable[[TrialSpec, int], Trial] = run_trial) -> SearchResult:
    """`largest_batch` with real trials of `spec`; one progress line per trial."""
    def try_batch(batch: int) -> Trial:
        result = trial(spec, batch)
        if progress:
            peak = f"{result.peak_bytes / 2**20:.0f} MiB" if result.peak_bytes else "-"
            sys.stderr.write(f"memory: {spec.model} p{spec.patch} batch {batch}: "
                             f"{'fits' if result.fits else 'does not fit'} (peak {peak}; {result.reason})\n")
        return result

    return largest_batch(try_batch, start, limit)


def search_table(specs: Sequence[TrialSpec], start: int = 1, limit: int = 1024, progress: bool = True,
                 trial: Callable[[TrialSpec, int], Trial] = run_trial) -> list[dict]:
    """One row per trial of every spec (the memory vs batch table), each with the spec's largest batch."""
    rows = []
    for spec in specs:
        result = search(spec, start, limit, progress, trial)
        for t in sorted(result.trials, key=lambda t: t.batch):
            rows.append({**dataclasses.asdict(spec), "batch": t.batch, "fits": t.fits, "peak_bytes": t.peak_bytes,
                         "baseline_bytes": t.baseline_bytes, "source": t.source, "reason": t.reason,
                         "largest_batch": result.largest, "limit_reached": result.limit_reached})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = ("model", "preset", "patch", "precision", "batch", "fits", "peak MiB", "runtime MiB", "largest")
    lines = [head]
    for r in rows:
        mib = (lambda v: f"{v / 2**20:.0f}" if v else "-")
        lines.append((r["model"], r["preset"], str(r["patch"]), r["precision"], str(r["batch"]),
                      "yes" if r["fits"] else "no", mib(r["peak_bytes"]), mib(r["baseline_bytes"]),
                      f"{r['largest_batch']}{'+' if r['limit_reached'] else ''}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def run_memory(out: str | Path, models: Sequence[str], patches: Sequence[int], *, preset: str = "tiny",
               precision: str = "fp32", xla: bool = False, budget_bytes: int | None = None,
               runner: str = "engine", start: int = 1, limit: int = 1024, progress: bool = True
               ) -> tuple[list[dict], str]:
    """`cellavie bench --memory`: the search for every model x patch; writes OUT/memory.json and memory.txt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [TrialSpec(m, preset, p, precision, xla, budget_bytes=budget_bytes, runner=runner)
             for m in models for p in patches]
    rows = search_table(specs, start, limit, progress)
    table = format_table(rows)
    (out / "memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "memory.txt").write_text(table + "\n")
    return rows, table


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch_rss(budget_bytes: int) -> None:
    """End the process (EXIT_OVER_BUDGET) as soon as its RSS crosses the budget."""
    while True:
        rss = _rss_bytes()
        if rss > budget_bytes:
            print(json.dumps({"peak_bytes": rss, "source": "rss", "error": "over budget"}), flush=True)
            os._exit(EXIT_OVER_BUDGET)
        time.sleep(0.005)


def _engine_steps(spec: TrialSpec, batch: int) -> None:
    """`spec.steps` training steps through the engine's step function on synthetic tensors."""
    import keras
    import tensorflow as tf

    from cellavie_hpc.launch import job_env
    from cellavie_hpc.models.registry import DEFAULT_CHANNELS, build_model, model_spec
    from cellavie_hpc.perf.portable import synthetic_batch
    from cellavie_hpc.train import backends
    from cellavie_hpc.train.config import resolve
    from cellavie_hpc.train.loop import build_step, configure_tensorflow, make_optimizer

    config = resolve({"data": {"dataset": "synthetic", "patch": spec.patch},
                      "model": {"name": spec.model, "preset": spec.preset},
                      "train": {"batch_per_replica": batch, "precision": spec.precision, "xla": spec.xla}})
    configure_tensorflow(config)
    backend = backends.create("single", job_env.detect())
    channels = DEFAULT_CHANNELS[spec.model]
    model_info = model_spec(spec.model, spec.preset, spec.patch, channels)
    model = build_model(spec.model, spec.preset, spec.patch, channels)
    optimizer = make_optimizer(config, 1)
    optimizer.build(model.trainable_variables)
    step = build_step(model, optimizer, model_info, backend, 1, spec.xla)
    x, y = synthetic_batch(model_info, batch)
    chunk = (tf.constant(x[None]), {k: tf.constant(v[None]) for k, v in y.items()})
    for _ in range(spec.steps):
        losses, _ = step(chunk, tf.constant(1, tf.int32), tf.constant(0.0))
        losses.numpy()
    keras.backend.clear_session()


def _portable_steps(spec: TrialSpec, batch: int) -> None:
    from cellavie_hpc.perf.portable import build_trainer

    trainer, _, x, y = build_trainer(spec.model, spec.preset, spec.patch, batch, spec.precision, spec.xla)
    for _ in range(spec.steps):
        trainer.train_on_batch(x, y)


def _exhausted(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, MemoryError) or "ResourceExhausted" in text or "RESOURCE_EXHAUSTED" in text \
        or "out of memory" in text.lower()


def _trial_main(argv: list[str]) -> int:
    """Subprocess entry: `python -m cellavie_hpc.perf.memory SPEC_JSON BATCH`; prints one JSON line."""
    spec = TrialSpec(**json.loads(argv[0]))
    batch = int(argv[1])
    import keras

    if spec.runner == "portable":
        from cellavie_hpc.perf import portable as probe
    else:
        from cellavie_hpc.train import environment as probe  # noqa: F811 - the engine's memory probe
    keras.ops.convert_to_numpy(keras.ops.ones((1,)))  # the runtime is up: what is left is the trial's
    baseline = _rss_bytes()
    on_cpu = probe.peak_memory()[1] == "rss"
    budget = spec.budget_bytes
    if budget is None and on_cpu:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if budget is not None and on_cpu:
        threading.Thread(target=_watch_rss, args=(budget,), daemon=True).start()
    try:
        (_portable_steps if spec.runner == "portable" else _engine_steps)(spec, batch)
    except Exception as err:  # noqa: BLE001 - classified: out-of-memory vs a real error
        if not _exhausted(err):
            raise
        print(json.dumps({"error": f"{type(err).__name__}: {str(err)[:500]}", "baseline_bytes": baseline}), flush=True)
        return EXIT_EXHAUSTED
    used, source = probe.peak_memory()
    if budget is not None and used > budget:
        print(json.dumps({"peak_bytes": used, "baseline_bytes": baseline, "source": source}), flush=True)
        return EXIT_OVER_BUDGET
    print(json.dumps({"peak_bytes": used, "baseline_bytes": baseline, "source": source}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
