"""Smoke tests of the distributed engines, run for real (no mocks).

Each test launches two worker processes on this machine and checks what the
workers wrote to ``tmp_path``:

* Horovod allreduce under ``horovodrun --gloo`` and ``mpirun``: exact sums.
* Horovod ``DistributedGradientTape`` training of a tiny Keras 3 model through
  ``cellavie_hpc.train.hvd_compat``: bit-identical weights on both ranks, equal
  (to float32 round-off) to single-process training on the union of the data.
* A deliberately unsynchronised run, to prove the checks above (and
  ``hvd_compat.assert_variables_in_sync``) would catch silent divergence.
* ``tf.distribute.MultiWorkerMirroredStrategy`` over loopback: identical weights.

Horovod tests skip when Horovod is not built, and fail instead under
``CELLAVIE_REQUIRE_HOROVOD=1`` (see tests/_requirements.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cellavie_hpc.launch.job_env import free_ports
from cellavie_hpc.launch.mpirun import local_mpirun

try:  # tests/ is on sys.path under pytest's default "prepend" import mode
    from _requirements import require_horovod, require_mpirun
except ImportError:  # tests/ is a package
    from tests._requirements import require_horovod, require_mpirun

REPO = Path(__file__).resolve().parents[1]
NPROC = 2
TIMEOUT_S = 240  # per multi-process launch: 4-15 s on 2 idle cores, ~75 s on a heavily loaded machine


@pytest.fixture
def horovod_available():
    """Horovod info; skip (or fail under CELLAVIE_REQUIRE_HOROVOD=1) without Horovod."""
    return require_horovod()


# --------------------------------------------------------------------------- workers
# Shared by all workers: the tiny model and the per-rank data.
_COMMON = r'''
import json, os, sys
import numpy as np
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import tensorflow as tf
import keras

STEPS, LR, BATCH = 6, 0.05, 16

def make_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])

def rank_data(rank):
    rng = np.random.default_rng(1000 + rank)
    x = rng.normal(size=(BATCH, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32") + 0.5 * rank).astype("float32")
    return x, y

def weights(model):
    return [np.array(v.numpy()) for v in model.weights]

def reference_training(init, n_ranks):
    """Single process, plain SGD on the union of all ranks' data (mean loss)."""
    model = make_model()
    model.set_weights(init)
    xs, ys = zip(*(rank_data(r) for r in range(n_ranks)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    opt = keras.optimizers.SGD(LR)
    for _ in range(STEPS):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return weights(model)

def save(out, tag, **arrays):
    np.savez(os.path.join(out, f"{tag}.npz"), **arrays)
'''

_HVD_ALLREDUCE = r'''
import json, os, sys
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

out = sys.argv[1]
hvd.init()
r = hvd.rank()
x_f = tf.constant(np.array([0.1, 1e16, -3.5, 2.0 ** -30, 1.0 / 3.0], np.float64) * (r + 1))
x_i = tf.constant(np.arange(6, dtype=np.int64) * 1_000_003 + r)
s_f = hvd.allreduce(x_f, op=hvd.Sum, name="smoke_f64")
s_i = hvd.allreduce(x_i, op=hvd.Sum, name="smoke_i64")
res = dict(rank=r, size=hvd.size(), mpi=bool(hvd.mpi_enabled()), gloo=bool(hvd.gloo_enabled()),
           sum_f=[float(v).hex() for v in s_f.numpy()], sum_i=[int(v) for v in s_i.numpy()])
with open(os.path.join(out, f"rank{r}.json"), "w") as fh:
    json.dump(res, fh)
hvd.shutdown()
'''

_HVD_TRAIN = _COMMON + r'''
import horovod.tensorflow as hvd
from cellavie_hpc.train import hvd_compat

out, mode = sys.argv[1], sys.argv[2]   # mode: "sync" | "nosync" (gradients not averaged)
hvd.init()
r, n = hvd.rank(), hvd.size()
keras.utils.set_random_seed(100 + r)   # different initial weights per rank on purpose
model = make_model()
opt = keras.optimizers.SGD(LR)
before_bcast = weights(model)
hvd_compat.broadcast_keras_variables(hvd, model.variables, root_rank=0)
init = weights(model)
x, y = rank_data(r)
for _ in range(STEPS):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    if mode == "sync":
        grads = hvd_compat.distributed_gradients(hvd, tape, loss, model.trainable_variables)
    else:
        grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
try:
    hvd_compat.assert_variables_in_sync(hvd, model.variables)
    sync_error = ""
except RuntimeError as exc:
    sync_error = str(exc)
final = weights(model)
info = dict(rank=r, size=n, mpi=bool(hvd.mpi_enabled()), gloo=bool(hvd.gloo_enabled()), sync_error=sync_error)
hvd.shutdown()
arrays = {f"before_{i}": w for i, w in enumerate(before_bcast)}
arrays.update({f"init_{i}": w for i, w in enumerate(init)})
arrays.update({f"final_{i}": w for i, w in enumerate(final)})
if r == 0:
    arrays.update({f"ref_{i}": w for i, w in enumerate(reference_training(init, n))})
save(out, f"rank{r}", **arrays)
with open(os.path.join(out, f"rank{r}.json"), "w") as fh:
    json.dump(info, fh)
'''

_MWMS_TRAIN = _COMMON + r'''
out = sys.argv[1]
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
strategy = tf.distribute.MultiWorkerMirroredStrategy()
n = strategy.num_replicas_in_sync
keras.utils.set_random_seed(200 + task)   # different seeds: MWMS must sync initial values
with strategy.scope():
    model = make_model()
    opt = keras.optimizers.SGD(LR)
init = weights(model)
x, y = (tf.constant(a) for a in rank_data(task))

@tf.function
def train_step(x, y):
    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            # scale by the *global* batch: the optimizer all-reduce *sums* gradients
            loss = tf.reduce_sum(tf.square(pred - y)) / (BATCH * n)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return strategy.run(replica_fn, args=(x, y))

for _ in range(STEPS):
    train_step(x, y)
arrays = {f"init_{i}": w for i, w in enumerate(init)}
arrays.update({f"final_{i}": w for i, w in enumerate(weights(model))})
if task == 0:
    arrays.update({f"ref_{i}": w for i, w in enumerate(reference_training(init, n))})
save(out, f"rank{task}", **arrays, n_replicas=np.array(n))
'''


# --------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        OMP_NUM_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    env.update(extra)
    return env


def _tail(text: str, n: int = 60) -> str:
    lines = [ln for ln in text.splitlines() if "oneDNN custom operations" not in ln and "absl::InitializeLog" not in ln]
    return "\n".join(lines[-n:])


def _launch(cmds: list[list[str]], envs: list[dict], cwd: Path, timeout: float = TIMEOUT_S) -> list[str]:
    """Start all commands (own process groups), wait with one deadline, fail on error/timeout."""
    procs = [subprocess.Popen(c, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for c, e in zip(cmds, envs)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate()[0] for p in procs]
        pytest.fail(f"timed out after {timeout:.0f} s: {cmds}\n" + "\n---\n".join(_tail(o) for o in outs),
                    pytrace=False)
    for c, p, out in zip(cmds, procs, outs):
        if p.returncode != 0:
            pytest.fail(f"exit code {p.returncode}: {' '.join(c)}\n{_tail(out)}", pytrace=False)
    return outs


def _write_worker(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _horovod_cmd(launcher: str, hvd_info) -> list[str]:
    if launcher == "gloo":
        return [hvd_info.horovodrun, "-np", str(NPROC), "-H", f"localhost:{NPROC}", "--gloo",
                "--network-interfaces", "lo", "--start-timeout", "60"]
    cmd = local_mpirun(NPROC)
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


@pytest.fixture(params=["gloo", "mpi"])
def horovod_launcher(request, horovod_available):
    """(name, command prefix) launching NPROC local ranks with horovodrun --gloo or mpirun."""
    if request.param == "mpi":
        require_mpirun()
    return request.param, _horovod_cmd(request.param, horovod_available)


def _load(tmp_path: Path, rank: int) -> tuple[dict, dict]:
    with np.load(tmp_path / f"rank{rank}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    info = json.loads((tmp_path / f"rank{rank}.json").read_text()) if (tmp_path / f"rank{rank}.json").exists() else {}
    return info, arrays


def _stack(arrays: dict, prefix: str) -> list[np.ndarray]:
    keys = sorted((k for k in arrays if k.startswith(prefix + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    assert keys, f"no {prefix}_* arrays written"
    return [arrays[k] for k in keys]


def _bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b))


def _assert_controller(info: dict, launcher: str) -> None:
    # the run really used the engine named by the launcher
    if launcher == "gloo":
        assert info["gloo"] and not info["mpi"], info
    else:
        assert info["mpi"] and not info["gloo"], info


# --------------------------------------------------------------------------- tests
@pytest.mark.horovod
def test_horovod_allreduce_exact_sum(tmp_path, horovod_launcher):
    launcher, prefix = horovod_launcher
    worker = _write_worker(tmp_path, "hvd_allreduce.py", _HVD_ALLREDUCE)
    _launch([prefix + [sys.executable, str(worker), str(tmp_path)]], [_env()], cwd=tmp_path)

    base_f = np.array([0.1, 1e16, -3.5, 2.0 ** -30, 1.0 / 3.0], np.float64)
    want_f = [float(v).hex() for v in sum(base_f * (r + 1) for r in range(NPROC))]
    want_i = [int(v) for v in sum(np.arange(6, dtype=np.int64) * 1_000_003 + r for r in range(NPROC))]
    for r in range(NPROC):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["rank"] == r and res["size"] == NPROC
        _assert_controller(res, launcher)
        assert res["sum_i"] == want_i
        assert res["sum_f"] == want_f  # exact: compared as hex floats


@pytest.mark.horovod
def test_horovod_gradient_tape_training_bit_identical(tmp_path, horovod_launcher):
    launcher, prefix = horovod_launcher
    worker = _write_worker(tmp_path, "hvd_train.py", _HVD_TRAIN)
    _launch([prefix + [sys.executable, str(worker), str(tmp_path), "sync"]], [_env()], cwd=tmp_path)

    (info0, a0), (info1, a1) = _load(tmp_path, 0), _load(tmp_path, 1)
    for info in (info0, info1):
        _assert_controller(info, launcher)
        assert info["sync_error"] == "", info["sync_error"]
    # the ranks started from different weights, and the broadcast made them equal
    assert not _bit_identical(_stack(a0, "before"), _stack(a1, "before"))
    assert _bit_identical(_stack(a0, "init"), _stack(a1, "init"))
    assert _bit_identical(_stack(a0, "init"), _stack(a0, "before"))  # root's values won
    # training happened, and ended bit-identical on both ranks
    final0, final1 = _stack(a0, "final"), _stack(a1, "final")
    assert not _bit_identical(final0, _stack(a0, "init"))
    assert _bit_identical(final0, final1)
    # gradients were really averaged: equals one process training on both ranks' data
    for got, ref in zip(final0, _stack(a0, "ref")):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.horovod
def test_horovod_desynchronisation_is_detected(tmp_path, horovod_available):
    """Same run without gradient averaging: the checks used above must see the divergence."""
    worker = _write_worker(tmp_path, "hvd_train.py", _HVD_TRAIN)
    prefix = _horovod_cmd("gloo", horovod_available)
    _launch([prefix + [sys.executable, str(worker), str(tmp_path), "nosync"]], [_env()], cwd=tmp_path)

    (info0, a0), (info1, a1) = _load(tmp_path, 0), _load(tmp_path, 1)
    assert _bit_identical(_stack(a0, "init"), _stack(a1, "init"))      # broadcast still worked
    assert not _bit_identical(_stack(a0, "final"), _stack(a1, "final"))  # ...but the ranks diverged
    for info in (info0, info1):  # and hvd_compat.assert_variables_in_sync raised on every rank
        assert "out of sync" in info["sync_error"], info




def test_multiworker_mirrored_strategy_identical_weights(tmp_path):
    worker = _write_worker(tmp_path, "mwms_train.py", _MWMS_TRAIN)
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(NPROC)]}
    envs = [_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(NPROC)]
    _launch([[sys.executable, str(worker), str(tmp_path)] for _ in range(NPROC)], envs, cwd=tmp_path)

    (_, a0), (_, a1) = _load(tmp_path, 0), _load(tmp_path, 1)
    assert int(a0["n_replicas"]) == NPROC == int(a1["n_replicas"])
    assert _bit_identical(_stack(a0, "init"), _stack(a1, "init"))
    final0, final1 = _stack(a0, "final"), _stack(a1, "final")
    assert not _bit_identical(final0, _stack(a0, "init"))
    assert _bit_identical(final0, final1)
    for got, ref in zip(final0, _stack(a0, "ref")):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
