"""Where this process stands in its job: rank, world size, node, Slurm ids. The only reader of launcher variables.

Launchers announce ranks differently: Slurm (`srun`, sbatch tasks), Open MPI's `mpirun`, `horovodrun`
with Gloo, or `TF_CONFIG` for TensorFlow workers. Everything else in the package asks this module,
and outside any launcher a process is rank 0 of 1 on this host.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class JobEnvironment:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node_rank: int = 0
    nodes: int = 1
    node: str = field(default_factory=socket.gethostname)
    launcher: str = "none"
    job_id: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None
    restart_count: int = 0
    hostnames: tuple[str, ...] = ()

    def slurm_ids(self) -> dict:
        return {
            "job_id": self.job_id,
            "array_job_id": self.array_job_id,
            "array_task_id": self.array_task_id,
            "restart_count": self.restart_count,
        }


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list such as `node[01-03,07],gpu5` into host names (no `scontrol` needed)."""
    hosts: list[str] = []
    depth, token = 0, ""
    parts = []
    for ch in hostlist:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    if token:
        parts.append(token)
    for part in parts:
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, _, rest = part.partition("[")
        ranges, _, suffix = rest.partition("]")
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` now: the addresses of a local TF_CONFIG cluster."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(workers: Sequence[str], rank: int) -> str:
    """The `TF_CONFIG` value that makes this process worker `rank` of `workers` ("host:port" each): what
    `detect` reads back, for launchers that start TensorFlow workers without Slurm."""
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": int(rank)}})


def detect(env: Mapping[str, str] | None = None) -> JobEnvironment:
    """Read the launcher's variables: mpirun/horovodrun first (they may run inside an allocation), then a
    Slurm job step (`srun`; a batch script outside any step is one process), then `TF_CONFIG`."""
    env = os.environ if env is None else env
    slurm = {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": _int(env, "SLURM_ARRAY_TASK_ID", -1) if env.get("SLURM_ARRAY_TASK_ID") else None,
        "restart_count": _int(env, "SLURM_RESTART_COUNT", 0),
    }
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    hostnames = tuple(expand_hostlist(env["SLURM_JOB_NODELIST"])) if env.get("SLURM_JOB_NODELIST") else ()
    if "OMPI_COMM_WORLD_RANK" in env:
        size = _int(env, "OMPI_COMM_WORLD_SIZE", 1)
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
        return JobEnvironment(
            rank=_int(env, "OMPI_COMM_WORLD_RANK", 0), world_size=size,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), local_size=local_size,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", 0), nodes=max(1, size // max(1, local_size)),
            node=node, launcher="mpirun", hostnames=hostnames, **slurm,
        )
    if "HOROVOD_RANK" in env:
        return JobEnvironment(
            rank=_int(env, "HOROVOD_RANK", 0), world_size=_int(env, "HOROVOD_SIZE", 1),
            local_rank=_int(env, "HOROVOD_LOCAL_RANK", 0), local_size=_int(env, "HOROVOD_LOCAL_SIZE", 1),
            node_rank=_int(env, "HOROVOD_CROSS_RANK", 0), nodes=_int(env, "HOROVOD_CROSS_SIZE", 1),
            node=node, launcher="horovodrun", hostnames=hostnames, **slurm,
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        world = _int(env, "SLURM_NTASKS", 1)
        return JobEnvironment(
            rank=_int(env, "SLURM_PROCID", 0), world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0), local_size=max(1, world // max(1, nodes)),
            node_rank=_int(env, "SLURM_NODEID", 0), nodes=nodes, node=node, launcher="slurm",
            hostnames=hostnames, **slurm,
        )
    if env.get("TF_CONFIG"):
        try:
            tf_config = json.loads(env["TF_CONFIG"])
            workers = tf_config["cluster"]["worker"]
            index = int(tf_config["task"]["index"])
        except (ValueError, KeyError, TypeError):
            return JobEnvironment(node=node, **slurm)
        hosts = [str(w).rsplit(":", 1)[0] for w in workers]
        unique = list(dict.fromkeys(hosts))
        mine = hosts[index] if 0 <= index < len(hosts) else node
        return JobEnvironment(
            rank=index, world_size=len(workers), local_rank=hosts[:index].count(mine),
            local_size=hosts.count(mine), node_rank=unique.index(mine) if mine in unique else 0,
            nodes=len(unique), node=node, launcher="tf_config", **slurm,
        )
    return JobEnvironment(node=node, launcher="slurm" if env.get("SLURM_JOB_ID") else "none", **slurm)
