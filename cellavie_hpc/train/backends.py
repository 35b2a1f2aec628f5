"""Distribution back-ends: the few operations the training step needs, behind one interface.

The step (`train/loop.py`) is written once against `Backend`; the back-end decides how replicas are
placed and how gradients meet:

* `single`      one process, one device.
* `mirrored`    one process, all local GPUs (`tf.distribute.MirroredStrategy`); without a GPU the CPU is
                split into `train.cpu_replicas` logical devices, which exercises the same code on a laptop.
* `multiworker` one process per task (`MultiWorkerMirroredStrategy`); the cluster comes from Slurm
                (`SlurmClusterResolver` inside `srun`, also what submitit runs) or from `TF_CONFIG`.
* `horovod`     one process per task, gradients averaged by Horovod's allreduce (`horovodrun`, `mpirun`, `srun --mpi`).

Gradient averaging differs on purpose. Keras 3 optimisers all-reduce (sum) gradients themselves when
they run inside a `tf.distribute` replica context, so the TF strategies only divide by the replica
count (and cast for compression) before `apply_gradients`. Horovod has no such hook, so its back-end
averages explicitly after the local accumulation of micro-batches, so accumulation costs no extra
exchanges: either one grouped allreduce per update (`train.horovod.exchange: grouped`) or one allreduce
per gradient (`per_tensor`, what `hvd.DistributedGradientTape` does), which Horovod starts as soon as
that gradient exists and fuses with the others ready in the same cycle - the exchange then overlaps
the rest of the backward pass (`cellavie_hpc.report.timeline` measures how much).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

import tensorflow as tf

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch.job_env import JobEnvironment

COMPRESSION_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}
#: Horovod aligns every tensor in its fusion buffer to this many bytes (FUSION_BUFFER_ATOMIC_UNIT).
FUSION_ALIGN_BYTES = 64
#: Horovod 0.28's default fusion threshold (HOROVOD_FUSION_THRESHOLD unset).
DEFAULT_FUSION_THRESHOLD_BYTES = 128 * 1024 * 1024


def gradient_bytes(variables: Sequence[Any], compression: str = "none") -> list[int]:
    """Bytes each trainable variable's gradient puts on the wire (float32, or 2 bytes under fp16/bf16 compression)."""
    per_value = 2 if compression in COMPRESSION_DTYPES else 4
    return [int(math.prod(v.shape)) * per_value for v in variables]


def propose_fusion_threshold(tensor_bytes: Sequence[int], messages: int = 1) -> int:
    """A Horovod fusion threshold (bytes) that sends one step's gradients in about `messages` fused allreduces.

    One message per step pays the allreduce latency once (what matters at many GPUs, where a ring
    all-reduce costs 2(N-1) latency hops per message); more messages let the first ones start while the
    backward pass still runs (overlap). The threshold covers the tensors' sizes padded to Horovod's
    alignment, is never below the largest tensor, and is rounded up to 4 KiB.
    """
    if not tensor_bytes or messages < 1:
        raise ValueError("propose_fusion_threshold needs at least one tensor size and messages >= 1")
    padded = [-(-b // FUSION_ALIGN_BYTES) * FUSION_ALIGN_BYTES for b in tensor_bytes]
    threshold = max(max(padded), -(-sum(padded) // messages))
    return -(-threshold // 4096) * 4096


class Backend:
    """Placement and communication for the training step.

    `rank`/`world_size` count processes (one input pipeline each, the unit of data sharding);
    `replicas` counts replicas in sync over all processes; `local_replicas` those fed by this process.
    """

    name = "single"

    def __init__(self, job: JobEnvironment, compression: str = "none"):
        self.job = job
        self.compression = compression
        self.rank = 0
        self.world_size = 1
        self.replicas = 1
        self.local_replicas = 1

    def scope(self) -> contextlib.AbstractContextManager:
        """Context in which the model and optimiser variables are created."""
        return contextlib.nullcontext()

    def distribute(self, dataset_fn: Callable[[], tf.data.Dataset]) -> Any:
        """An iterable of per-replica elements from this process's dataset (one element per local replica)."""
        return dataset_fn()

    def run(self, fn: Callable, args: tuple) -> Any:
        """Run `fn(*args)` on every local replica (replica context)."""
        return fn(*args)

    def reduce_mean(self, value: Any) -> tf.Tensor:
        """Mean over all replicas of a per-replica result (cross-replica context, collective)."""
        return value

    def reduce_sum(self, value: Any) -> tf.Tensor:
        """Sum over all replicas of a per-replica result (cross-replica context, collective)."""
        return value

    def prepare_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Turn this replica's gradients into the ones to hand to `optimizer.apply_gradients` (replica context)."""
        return list(grads)

    def broadcast_variables(self, variables: Sequence[Any]) -> None:
        """Make every replica start from rank 0's values (after the model and optimiser are built)."""

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def average_variables(self, variables: Sequence[Any]) -> None:
        """Replace `variables` by their mean over processes (non-trainable state such as BatchNorm moving
        statistics, which each process updates from its own batches). Collective."""

    def exchange_probe(self, shapes: Sequence[tf.TensorShape]) -> Callable[[], None] | None:
        """A function that all-reduces tensors of the gradients' shapes (to time the exchange), or None."""
        return None

    def local_values(self, value: Any) -> list[Any]:
        """The values of a per-replica result held by this process, one per local replica."""
        return [value]


def _compress(grads: Sequence[tf.Tensor], compression: str) -> list[tf.Tensor]:
    dtype = COMPRESSION_DTYPES.get(compression)
    return [g if dtype is None or g is None or not g.dtype.is_floating else tf.cast(g, dtype) for g in grads]


class _StrategyBackend(Backend):
    """Common part of the `tf.distribute` back-ends."""

    strategy: tf.distribute.Strategy

    def _finish_setup(self) -> None:
        self.replicas = self.strategy.num_replicas_in_sync
        self.local_replicas = len(self.strategy.extended.worker_devices)

    def scope(self):
        return self.strategy.scope()

    def distribute(self, dataset_fn):
        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            if context.input_pipeline_id != self.rank:
                raise RuntimeError(
                    f"input pipeline {context.input_pipeline_id} of {context.num_input_pipelines} built on rank "
                    f"{self.rank}: the cluster's task order differs from the job environment's ranks"
                )
            return dataset_fn()

        return self.strategy.distribute_datasets_from_function(per_worker)

    def run(self, fn, args):
        return self.strategy.run(fn, args=args)

    def reduce_mean(self, value):
        return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

    def reduce_sum(self, value):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    def prepare_gradients(self, grads):
        # The Keras optimiser sums over replicas inside apply_gradients; pre-dividing makes it a mean.
        scale = 1.0 / self.replicas
        return _compress([None if g is None else g * tf.cast(scale, g.dtype) for g in grads], self.compression)

    def barrier(self):
        self.reduce_sum(self._ones()).numpy()

    @tf.function
    def _ones(self):
        return self.strategy.run(lambda: tf.ones([], tf.float32))

    def exchange_probe(self, shapes):
        ctx = tf.distribute.ReduceOp.SUM
        dtype = COMPRESSION_DTYPES.get(self.compression, tf.float32)

        @tf.function
        def probe():
            def replica():
                tensors = [tf.zeros(s, dtype) for s in shapes]
                return tf.distribute.get_replica_context().all_reduce(ctx, tensors)[0]

            return self.strategy.run(replica)

        def run_probe() -> None:
            tf.nest.map_structure(lambda t: t.numpy(), self.local_values(probe()))

        return run_probe

    def local_values(self, value):
        return list(self.strategy.experimental_local_results(value))


class MirroredBackend(_StrategyBackend):
    name = "mirrored"

    def __init__(self, job: JobEnvironment, compression: str = "none", cpu_replicas: int = 1):
        super().__init__(job, compression)
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            devices = [f"/gpu:{i}" for i in range(len(gpus))]
        else:
            cpu = tf.config.list_physical_devices("CPU")[0]
            if cpu_replicas > 1:
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)]
                )
            devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
        # Ring all-reduce between CPU devices; NCCL where GPUs are present.
        cross = None if gpus else tf.distribute.ReductionToOneDevice()
        self.strategy = tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross)
        self._finish_setup()


class MultiWorkerBackend(_StrategyBackend):
    name = "multiworker"

    def __init__(self, job: JobEnvironment, compression: str = "none", port_base: int = 8888):
        super().__init__(job, compression)
        gpus = tf.config.list_physical_devices("GPU")
        if job.launcher == "slurm":
            # Without GPUs, TF's resolver still divides by gpus_per_task: one (ignored) device slot per task.
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=port_base, gpus_per_node=len(gpus) or job.local_size, gpus_per_task=1,
            )
        elif job.launcher == "tf_config":
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        else:
            raise ConfigError(
                f"train.backend=multiworker needs a cluster: run the tasks under srun (Slurm) or set TF_CONFIG "
                f"(this process was started by launcher {job.launcher!r}); use backend=single or mirrored otherwise"
            )
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        self.rank = int(resolver.task_id)
        self.world_size = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
        self._finish_setup()


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, job: JobEnvironment, compression: str = "none", exchange: str = "grouped",
                 environment: dict[str, str] | None = None):
        super().__init__(job, compression)
        # Horovod reads its tuning variables once, in hvd.init(); set them first.
        self.environment = dict(environment or {})
        os.environ.update(self.environment)
        self.exchange = exchange
        try:
            import horovod.tensorflow as hvd
        except ImportError as err:
            raise ConfigError(
                f"train.backend=horovod but horovod.tensorflow does not import ({err}); "
                "build it with tools/build_horovod.sh or choose backend=multiworker"
            ) from err
        from cellavie_hpc.train import hvd_compat

        self.hvd = hvd
        self.compat = hvd_compat
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[hvd.local_rank() % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.replicas = hvd.size()
        self.compressor = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression]

    def reduce_mean(self, value):
        return self.hvd.allreduce(value, op=self.hvd.Average)

    def reduce_sum(self, value):
        return self.hvd.allreduce(value, op=self.hvd.Sum)

    def prepare_gradients(self, grads):
        if self.exchange == "per_tensor":
            return [self.hvd.allreduce(g, op=self.hvd.Average, compression=self.compressor) for g in grads]
        return list(self.hvd.grouped_allreduce(list(grads), op=self.hvd.Average, compression=self.compressor))

    def broadcast_variables(self, variables):
        self.compat.broadcast_keras_variables(self.hvd, variables, root_rank=0)

    def barrier(self):
        self.hvd.allreduce(tf.ones([]), op=self.hvd.Sum, name="cellavie_barrier").numpy()

    def average_variables(self, variables):
        for var in self.compat.tf_variables(variables):
            var.assign(self.hvd.allreduce(tf.convert_to_tensor(var), op=self.hvd.Average))

    def exchange_probe(self, shapes):
        @tf.function
        def probe():
            return self.prepare_gradients([tf.zeros(s, tf.float32) for s in shapes])

        def run_probe() -> None:
            probe()[0].numpy()

        return run_probe


def create(name: str, job: JobEnvironment, *, compression: str = "none", cpu_replicas: int = 1,
           port_base: int = 8888, horovod_exchange: str = "grouped",
           horovod_environment: dict[str, str] | None = None) -> Backend:
    """The back-end called `name` (train.backend), set up for this process. Call before any other TF op.

    `horovod_environment` (HOROVOD_* variables from `train.horovod`) is exported before `hvd.init()`.
    """
    if name == "single":
        return Backend(job, compression)
    if name == "mirrored":
        return MirroredBackend(job, compression, cpu_replicas)
    if name == "multiworker":
        return MultiWorkerBackend(job, compression, port_base)
    if name == "horovod":
        return HorovodBackend(job, compression, horovod_exchange, horovod_environment)
    raise ConfigError(f"unknown train.backend {name!r}; expected single, mirrored, multiworker or horovod")
