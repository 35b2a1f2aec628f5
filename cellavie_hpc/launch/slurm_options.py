"""The Slurm request of one job shape, as one validated dataclass: sbatch lines, srun flags, submitit parameters.

Every string that can reach a batch script is checked here against a whitelist (no spaces, quotes,
semicolons or newlines in a partition, account, QOS, constraint, job or module name) and is later
quoted with `shlex.quote` anyway. A hostile value such as `debug; rm -rf ~` is refused with the key
named, never escaped into something that happens to run.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch.sweep import ClusterSpec, Point

#: Signal Slurm sends `signal_delay_s` before the time limit; submitit's default (`SUBMITIT_PREEMPT_SIGNAL`).
PREEMPT_SIGNAL = "USR2"

_PATTERNS: dict[str, tuple[re.Pattern[str], str]] = {
    "job_name": (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}"), "letters, digits and _ . + -"),
    "partition": (re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"), "names of letters, digits, _ . - separated by commas"),
    "account": (re.compile(r"[A-Za-z0-9_.-]+"), "letters, digits and _ . -"),
    "qos": (re.compile(r"[A-Za-z0-9_.-]+"), "letters, digits and _ . -"),
    "constraint": (re.compile(r"[A-Za-z0-9_.,&|*\[\]():-]+"), "feature names with Slurm's & | , [ ] ( ) * : operators"),
    "module": (re.compile(r"[A-Za-z0-9_.+@-]+(/[A-Za-z0-9_.+@-]+)*"), "a module name such as cuda/12.2 or openmpi/4.1.5"),
    "mpi": (re.compile(r"[a-z0-9_]+"), "an srun --mpi plugin name such as pmix or pmi2"),
}


def check_name(key: str, value: str, kind: str | None = None) -> str:
    """`value` if it matches the whitelist of `kind` (default: `key`), else ConfigError naming `key`."""
    pattern, allowed = _PATTERNS[kind or key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"cluster.{key}: {value!r} is refused: only {allowed} may reach a batch script")
    return value


def check_line(key: str, value: str) -> str:
    """A free-form value (a path, a setup line): any text but one line (no newline, carriage return or NUL)."""
    if not isinstance(value, str) or any(c in value for c in "\n\r\x00") or not value.strip():
        raise ConfigError(f"{key}: {value!r} is refused: it must be one non-empty line (no newline or NUL)")
    return value


@dataclass(frozen=True)
class SlurmOptions:
    """What one job (or each task of one array) asks Slurm for, and how its ranks are started."""

    job_name: str
    time_min: int
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    gpu_request: Literal["gpus_per_node", "gres", "none"] = "gpus_per_node"
    bind_gpu_per_task: bool = False         # srun --gpus-per-task=1: each rank sees its own GPU
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_delay_s: int = 90
    mpi: str | None = None                  # srun --mpi=PLUGIN for MPI programs (Horovod: pmix)
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name("job_name", self.job_name)
        for key in ("partition", "account", "qos", "constraint", "mpi"):
            if getattr(self, key) is not None:
                check_name(key, getattr(self, key))
        for i, module in enumerate(self.modules):
            check_name(f"modules[{i}]", module, kind="module")
        for i, line in enumerate(self.setup):
            check_line(f"cluster.setup[{i}]", line)
        for key in ("time_min", "nodes", "ntasks_per_node"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise ConfigError(f"gpus_per_node must be >= 0 and cpus_per_task >= 1, got {self.gpus_per_node}, "
                              f"{self.cpus_per_task}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ConfigError(f"cluster.mem_gb must be positive, got {self.mem_gb}")

    @property
    def mem(self) -> str | None:
        """Memory per node as Slurm writes it (`16G`, `1536M`)."""
        if self.mem_gb is None:
            return None
        return f"{int(self.mem_gb)}G" if self.mem_gb == int(self.mem_gb) else f"{int(self.mem_gb * 1024)}M"

    @property
    def gpu_flag(self) -> tuple[str, str] | None:
        if self.gpus_per_node == 0 or self.gpu_request == "none":
            return None
        if self.gpu_request == "gres":
            return "gres", f"gpu:{self.gpus_per_node}"
        return "gpus-per-node", str(self.gpus_per_node)

    def sbatch_options(self) -> list[tuple[str, str | None]]:
        """(flag, value) pairs in a stable order; value None for a bare flag such as `--exclusive`."""
        opts: list[tuple[str, str | None]] = [("job-name", self.job_name)]
        opts += [(k.replace("_", "-"), getattr(self, k)) for k in ("partition", "account", "qos", "constraint")
                 if getattr(self, k) is not None]
        opts += [("time", str(self.time_min)), ("nodes", str(self.nodes)),
                 ("ntasks-per-node", str(self.ntasks_per_node))]
        if self.cpus_per_task is not None:
            opts.append(("cpus-per-task", str(self.cpus_per_task)))
        if self.gpu_flag:
            opts.append(self.gpu_flag)
        if self.mem:
            opts.append(("mem", self.mem))
        if self.exclusive:
            opts.append(("exclusive", None))
        return opts

    def sbatch_lines(self, extra: list[tuple[str, str | None]] = ()) -> list[str]:
        """`#SBATCH --flag=value` lines, every value shell-quoted."""
        return [f"#SBATCH --{flag}" if value is None else f"#SBATCH --{flag}={shlex.quote(value)}"
                for flag, value in [*self.sbatch_options(), *extra]]

    def srun_args(self) -> list[str]:
        """Flags for the srun that starts the ranks: the MPI plugin and one GPU per rank."""
        args = []
        if self.mpi:
            args.append(f"--mpi={self.mpi}")
        if self.bind_gpu_per_task and self.gpu_flag:
            args.append("--gpus-per-task=1")
        return args

    def setup_lines(self) -> list[str]:
        """`module load` lines (names whitelisted, quoted) then the user's verbatim setup lines."""
        return [f"module load {shlex.quote(m)}" for m in self.modules] + list(self.setup)

    def submitit_parameters(self, array_parallelism: int) -> dict[str, Any]:
        """Parameters of `submitit.SlurmExecutor.update_parameters` for the same request."""
        params: dict[str, Any] = {
            "job_name": self.job_name, "time": self.time_min, "nodes": self.nodes,
            "ntasks_per_node": self.ntasks_per_node, "signal_delay_s": self.signal_delay_s,
            "array_parallelism": array_parallelism, "srun_args": self.srun_args(),
            "setup": self.setup_lines(), "additional_parameters": {"requeue": True}, "wckey": None,
        }
        for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.gpu_flag:
            params["gres" if self.gpu_request == "gres" else "gpus_per_node"] = (
                self.gpu_flag[1] if self.gpu_request == "gres" else self.gpus_per_node)
        if self.exclusive:
            params["exclusive"] = True
        return params


def shape_of(point: Point) -> tuple[int, int, int, int, bool]:
    """What makes two points share one array job: nodes, tasks and GPUs per node, time, MPI."""
    return point.nodes, point.tasks_per_node, point.gpus_per_node, point.time_min, point.backend == "horovod"


def for_point(cluster: ClusterSpec, point: Point, sweep_name: str) -> SlurmOptions:
    """The Slurm request of a point (the same for every point of its shape)."""
    nodes, tasks, gpus, time_min, mpi = shape_of(point)
    return SlurmOptions(
        job_name=f"{sweep_name}-n{nodes}t{tasks}g{gpus}" + ("-mpi" if mpi else ""), time_min=time_min,
        nodes=nodes, ntasks_per_node=tasks, gpus_per_node=gpus, gpu_request=cluster.gpus,
        bind_gpu_per_task=tasks > 1, cpus_per_task=cluster.cpus_per_task, mem_gb=cluster.mem_gb,
        partition=cluster.partition, account=cluster.account, qos=cluster.qos, constraint=cluster.constraint,
        exclusive=cluster.exclusive, signal_delay_s=cluster.signal_delay_s, mpi=cluster.mpi if mpi else None,
        modules=tuple(cluster.modules), setup=tuple(cluster.setup),
    )


def python_command(cluster: ClusterSpec, python: str) -> list[str]:
    """How a rank starts Python: `python` (this interpreter), or `<runtime> exec ... IMAGE <python>`
    inside the sweep's container; each part is one validated line, quoted where it reaches a script."""
    c = cluster.container
    if c is None:
        return [python]
    check_line("cluster.container.image", c.image)
    check_line("cluster.container.python", c.python)
    binds = [part for i, b in enumerate(c.binds) for part in ("--bind", check_line(f"cluster.container.binds[{i}]", b))]
    return [c.runtime, "exec", *(["--nv"] if c.nv else []), *binds, c.image, c.python]
