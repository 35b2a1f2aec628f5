"""Allreduce probe, run by every rank: times allreduces from 4 KB up to the model's full gradient.

    mpirun -np 2 python -m cellavie_hpc.launch.comm_probe --engine mpi4py --run-dir RUN_DIR
    horovodrun --gloo -np 2 -H localhost:2 python -m cellavie_hpc.launch.comm_probe --engine horovod --run-dir RUN_DIR
    srun --mpi=pmix -n 8 python -m cellavie_hpc.launch.comm_probe --engine tf --run-dir RUN_DIR

Engines: `mpi4py` (raw MPI_Allreduce on numpy buffers, the reference), `horovod` (the training back-end's
Horovod; `HOROVOD_CPU_OPERATIONS=gloo|mpi` picks the CPU transport under mpirun/srun), `tf` (the training
back-end's MultiWorkerMirroredStrategy, ring collectives on CPU; needs srun or TF_CONFIG). Each size is
warmed up, then timed `repeats` times, each call after a barrier. Every rank writes
`RUN_DIR/comm/rank-XXXXX.jsonl` (schema in docs/communication.rst), kept apart from training records;
`read_comm_run` checks a run is complete and returns the collective's time per call (slowest rank).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.launch import job_env
from cellavie_hpc.launch.mpirun import local_mpirun, root_environment
from cellavie_hpc.progress import Progress

COMM_SCHEMA_VERSION = 1
ENGINES = ("horovod", "tf", "mpi4py")
MIN_BYTES = 4096
FLOAT32_BYTES = 4


def comm_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "comm" / f"rank-{rank:05d}.jsonl"


def message_sizes(max_bytes: int, min_bytes: int = MIN_BYTES, factor: int = 4) -> list[int]:
    """Message sizes (bytes, whole fp32 elements): min, min*factor, ... below max, then max itself."""
    if min_bytes < FLOAT32_BYTES or max_bytes < min_bytes or factor < 2:
        raise UserError(f"message sizes: need 4 <= min_bytes ({min_bytes}) <= max_bytes ({max_bytes}) and factor >= 2")
    top = max_bytes // FLOAT32_BYTES * FLOAT32_BYTES
    sizes = []
    size = min_bytes // FLOAT32_BYTES * FLOAT32_BYTES
    while size < top:
        sizes.append(size)
        size *= factor
    return sizes + [top]


def gradient_bytes(model: str, preset: str) -> int:
    """Bytes of the fp32 gradient of `model` at `preset`: trainable parameters x 4."""
    from cellavie_hpc.models.registry import build_model

    net = build_model(model, preset)
    return FLOAT32_BYTES * sum(int(np.prod(v.shape)) for v in net.trainable_variables)


class _Engine:
    """One collective implementation: a buffer per size, a timed allreduce returning element 0, a barrier."""

    name = ""
    transport = ""
    rank = 0
    world_size = 1

    def buffer(self, elements: int) -> Any:
        raise NotImplementedError

    def allreduce_fn(self, buffer: Any) -> Callable[[], float]:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return {}


class _Mpi4pyEngine(_Engine):
    name = "mpi4py"
    transport = "mpi"

    def __init__(self, job: job_env.JobEnvironment):
        from mpi4py import MPI

        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        if self.world_size != job.world_size:
            raise UserError(f"mpi4py sees {self.world_size} ranks but the launcher ({job.launcher}) announced "
                            f"{job.world_size}: start it with mpirun or srun --mpi=pmix")

    def buffer(self, elements):
        return np.full(elements, self.rank + 1, np.float32)

    def allreduce_fn(self, buffer):
        out = np.empty_like(buffer)

        def call() -> float:
            self.comm.Allreduce(buffer, out, op=self.mpi.SUM)
            return float(out[0])

        return call

    def barrier(self):
        self.comm.Barrier()

    def versions(self):
        import mpi4py

        return {"mpi4py": mpi4py.__version__, "mpi": self.mpi.Get_library_version().splitlines()[0].strip()}


class _TfBackendEngine(_Engine):
    """Horovod or MultiWorkerMirroredStrategy through the training back-end (what a training step uses)."""

    def __init__(self, job: job_env.JobEnvironment, backend_name: str):
        import tensorflow as tf

        from cellavie_hpc.train import backends

        self.tf = tf
        self.backend = backends.create(backend_name, job)
        self.rank, self.world_size = self.backend.rank, self.backend.world_size
        self.name = "tf" if backend_name == "multiworker" else backend_name
        if backend_name == "horovod":
            hvd = self.backend.hvd
            controller = "gloo" if hvd.gloo_enabled() else "mpi"
            # A Horovod setting (not a launcher identity): which library moves CPU tensors.
            self.transport = os.environ.get("HOROVOD_CPU_OPERATIONS", controller).lower()
            self._reduce = lambda x: hvd.allreduce(x, op=hvd.Sum)[:1]
        else:
            self.transport = "ring"
            strategy = self.backend.strategy
            self._reduce = lambda x: strategy.run(
                lambda: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(x))[:1])

    def buffer(self, elements):
        return self.tf.fill([elements], self.tf.constant(self.rank + 1, self.tf.float32))

    def allreduce_fn(self, buffer):
        # Only element 0 comes back to Python, so the timing is the collective, not a host copy of the result.
        fn = self.tf.function(self._reduce)

        def call() -> float:
            out = fn(buffer)
            if self.name == "tf":
                out = self.backend.local_values(out)[0]
            return float(out.numpy()[0])

        return call

    def barrier(self):
        self.backend.barrier()

    def versions(self):
        out = {"tensorflow": self.tf.__version__}
        if self.name == "horovod":
            import horovod

            out["horovod"] = horovod.__version__
        return out


def make_engine(name: str, job: job_env.JobEnvironment) -> _Engine:
    if name == "mpi4py":
        return _Mpi4pyEngine(job)
    if name in ("horovod", "tf"):
        return _TfBackendEngine(job, "multiworker" if name == "tf" else "horovod")
    raise UserError(f"comm probe: unknown engine {name!r}; expected one of {', '.join(ENGINES)}")


def _write(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
    handle.flush()


def run_probe(engine_name: str, run_dir: str | Path, sizes: list[int], *, warmup: int = 5, repeats: int = 20,
              model: str | None = None, preset: str | None = None, progress: bool = True) -> Path:
    """Time `repeats` allreduces of each size on this rank; write and return this rank's comm file."""
    if warmup < 0 or repeats < 1:
        raise UserError(f"comm probe: warmup ({warmup}) must be >= 0 and repeats ({repeats}) >= 1")
    job = job_env.detect()
    engine = make_engine(engine_name, job)
    expected = engine.world_size * (engine.world_size + 1) / 2
    path = comm_file(run_dir, engine.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with path.open("w") as handle, Progress(len(sizes), f"{engine_name} allreduce probe", unit="sizes",
                                            enabled=progress and engine.rank == 0) as bar:
        _write(handle, {
            "kind": "comm_header", "comm_schema_version": COMM_SCHEMA_VERSION, "engine": engine.name,
            "transport": engine.transport, "rank": engine.rank, "world_size": engine.world_size,
            "local_rank": job.local_rank, "node": job.node, "launcher": job.launcher, "job_id": job.job_id,
            "model": model, "preset": preset, "gradient_bytes": max(sizes), "dtype": "float32", "sizes": sizes,
            "warmup": warmup, "repeats": repeats, "time_unix": time.time(),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, **engine.versions()},
        })
        for size in sizes:
            call = engine.allreduce_fn(engine.buffer(size // FLOAT32_BYTES))
            for _ in range(warmup):
                call()
            times, value = [], math.nan
            for _ in range(repeats):
                engine.barrier()
                t0 = time.perf_counter()
                value = call()
                times.append(time.perf_counter() - t0)
            p10, med, p90 = np.percentile(times, [10, 50, 90])
            _write(handle, {"kind": "comm", "message_bytes": size, "elements": size // FLOAT32_BYTES,
                            "times_s": times, "median_s": float(med), "p10_s": float(p10), "p90_s": float(p90),
                            "check_ok": bool(value == expected)})
            bar.update()
        _write(handle, {"kind": "comm_final", "status": "completed", "sizes": len(sizes),
                        "wall_s": time.perf_counter() - start})
    return path


@dataclass
class CommRun:
    """A complete probe run: per message size, the collective's time of each call (slowest rank)."""

    run_dir: Path
    engine: str
    transport: str
    world_size: int
    model: str | None
    gradient_bytes: int
    message_bytes: np.ndarray  # (sizes,)
    times_s: np.ndarray  # (sizes, repeats): max over ranks of each call
    check_ok: bool
    header: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.engine}/{self.transport}"


def _read_rank(path: Path) -> tuple[dict, list[dict], dict | None]:
    header, rows, final = None, [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {number}: not JSON ({err}); rerun the probe") from err
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind == "comm_header":
            header = record
        elif kind == "comm":
            rows.append(record)
        elif kind == "comm_final":
            final = record
        else:
            raise DataError(f"{path} line {number}: unknown record kind {kind!r} (expected comm_header, comm, comm_final)")
    if header is None or header.get("comm_schema_version") != COMM_SCHEMA_VERSION:
        raise DataError(f"{path}: no comm_header of schema version {COMM_SCHEMA_VERSION}; rerun the probe")
    return header, rows, final


def read_comm_run(run_dir: str | Path) -> CommRun:
    """Read and check every rank's comm file of `run_dir`: all ranks, same sizes and repeats, completed."""
    run_dir = Path(run_dir)
    files = sorted((run_dir / "comm").glob("rank-*.jsonl"))
    if not files:
        raise DataError(f"{run_dir / 'comm'}: no rank-XXXXX.jsonl files; run `python -m cellavie_hpc.launch.comm_probe`")
    ranks = {}
    for path in files:
        header, rows, final = _read_rank(path)
        ranks[int(header["rank"])] = (path, header, rows, final)
    first = ranks[min(ranks)][1]
    world = int(first["world_size"])
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise DataError(f"{run_dir}: comm records of rank(s) {missing} of {world} are missing; rerun the probe")
    sizes = [int(s) for s in first["sizes"]]
    for rank, (path, header, rows, final) in sorted(ranks.items()):
        if (header["engine"], header["world_size"], header["sizes"]) != (first["engine"], world, first["sizes"]):
            raise DataError(f"{path}: rank {rank} probed {header['engine']} on {header['world_size']} ranks with sizes "
                            f"{header['sizes']}, rank {min(ranks)} {first['engine']} on {world} with {first['sizes']}")
        if final is None or final.get("status") != "completed" or [r["message_bytes"] for r in rows] != sizes:
            raise DataError(f"{path}: rank {rank} did not complete the probe ({len(rows)} of {len(sizes)} sizes); "
                            "see its log and rerun")
    times = np.array([[ranks[r][2][i]["times_s"] for r in range(world)] for i in range(len(sizes))], np.float64)
    return CommRun(run_dir=run_dir, engine=first["engine"], transport=first["transport"], world_size=world,
                   model=first.get("model"), gradient_bytes=int(first["gradient_bytes"]),
                   message_bytes=np.array(sizes, np.int64), times_s=times.max(axis=1),
                   check_ok=all(r["check_ok"] for _, _, rows, _ in ranks.values() for r in rows), header=first)


def fit_run(run: CommRun, algorithm: str = "ring", repeats: int = 200):
    """`comm_model.fit_alpha_beta` over every timed call of a probe run."""
    from cellavie_hpc.report.comm_model import fit_alpha_beta

    n = np.repeat(run.message_bytes, run.times_s.shape[1])
    return fit_alpha_beta(n, run.world_size, run.times_s.ravel(), engine=run.label, algorithm=algorithm,
                          repeats=repeats, model=run.model, gradient_bytes=float(run.gradient_bytes))


LOCAL_LAUNCHERS = ("horovodrun", "mpirun", "tf_config")


def local_commands(engine: str, launcher: str, run_dir: str | Path, nproc: int = 2,
                   probe_args: list[str] | tuple[str, ...] = ()) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, extra environment) of the processes that run the probe with `nproc` ranks on this host.

    `horovodrun` starts Gloo ranks, `mpirun` MPI ranks (Open MPI on loopback), `tf_config` one process per
    rank with its TF_CONFIG (MultiWorkerMirroredStrategy's own launcher-less cluster).
    """
    probe = [sys.executable, "-m", "cellavie_hpc.launch.comm_probe", "--engine", engine, "--run-dir", str(run_dir),
             *probe_args]
    if launcher == "horovodrun":
        horovodrun = Path(sys.executable).with_name("horovodrun")
        return [([str(horovodrun) if horovodrun.exists() else "horovodrun", "--gloo", "-np", str(nproc), "-H",
                  f"localhost:{nproc}", "--network-interfaces", "lo", "--start-timeout", "60", *probe], {})]
    if launcher == "mpirun":
        return [([*local_mpirun(nproc), *probe], root_environment())]
    if launcher == "tf_config":
        workers = [f"127.0.0.1:{port}" for port in job_env.free_ports(nproc)]
        return [(probe, {"TF_CONFIG": job_env.tf_config(workers, rank)}) for rank in range(nproc)]
    raise UserError(f"local launcher {launcher!r}: expected one of {', '.join(LOCAL_LAUNCHERS)}")


def launch_local(engine: str, launcher: str, run_dir: str | Path, nproc: int = 2,
                 probe_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> CommRun:
    """Run the probe with `nproc` local ranks and return the checked run (RuntimeError with the log otherwise)."""
    base = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in [k for k in base if k.startswith(("OMPI_COMM_WORLD", "HOROVOD_RANK", "PMIX_RANK")) or k == "TF_CONFIG"]:
        del base[key]  # a probe started from inside a job must not inherit that job's rank
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    logs, procs = [], []
    for i, (argv, extra) in enumerate(local_commands(engine, launcher, run_dir, nproc, probe_args)):
        log = (Path(run_dir) / f"launch-{i}.log").open("w")
        logs.append(log)
        procs.append((argv, subprocess.Popen(argv, env={**base, **extra}, stdout=log, stderr=subprocess.STDOUT)))
    deadline = time.monotonic() + timeout_s
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for _, proc in procs]
    except subprocess.TimeoutExpired:
        codes = [None] * len(procs)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if any(code != 0 for code in codes):
        tail = "\n".join((Path(run_dir) / f"launch-{i}.log").read_text()[-3000:] for i in range(len(procs)))
        raise RuntimeError(f"{engine} probe under {launcher} exited {codes} (None = killed after {timeout_s:.0f} s): "
                           f"{' '.join(procs[0][0])}\n{tail}")
    return read_comm_run(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellavie_hpc.launch.comm_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--model", default="unet", help="model whose fp32 gradient is the largest message")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--gradient-bytes", type=int,
                        help="fp32 gradient bytes of --model if already known (skips building the model)")
    parser.add_argument("--min-bytes", type=int, default=MIN_BYTES)
    parser.add_argument("--factor", type=int, default=4, help="ratio of successive message sizes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        top = args.gradient_bytes or gradient_bytes(args.model, args.preset)
        run_probe(args.engine, args.run_dir, message_sizes(top, args.min_bytes, args.factor), warmup=args.warmup,
                  repeats=args.repeats, model=args.model, preset=args.preset)
    except UserError as err:
        print(f"comm_probe: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
