"""The training loop every Slurm task runs: one `tf.function` step for every back-end.

Shape of a step. A *step* is one optimiser update. Each replica computes loss and gradients on
`grad_accum` micro-batches of `per_replica_batch` tiles (the forward/backward part is what `xla`
compiles), averages them locally, hands them to the back-end (which makes the update the mean over
all replicas) and applies them. `steps_per_execution` steps run inside one `tf.function` call,
looped with `tf.range`, so Python overhead is paid once per call.

Shape of the data. Each process reads its shard (sharding by (seed, epoch), rank, world size) as
micro-batches, groups them per call into one element per local replica of shape
`[steps x grad_accum, batch, ...]`, and the back-end feeds those elements to its replicas. The time
spent in `next(iterator)` - outside the `tf.function` - is the input wait; the call itself, up to
the loss reaching the host, is the compute time. Resuming skips the micro-batches an epoch has
already consumed, so the data order is the same as without the interruption.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import yaml

from cellavie_hpc.errors import ConfigError, UserError
from cellavie_hpc.launch import job_env
from cellavie_hpc.train import backends, checkpoint, environment
from cellavie_hpc.train.compile_cache import CompileCache
from cellavie_hpc.train.config import TrainConfig, as_mapping, config_hash
from cellavie_hpc.train.recording import RunRecorder, previous_attempts
from cellavie_hpc.train.signals import PREEMPTED_EXIT, StopRequest

COMPLETED_EXIT = 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
    status: str  # completed | preempted
    steps: int
    metrics: dict[str, float]
    records: Path
    rank: int
    world_size: int

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT if self.status == "preempted" else COMPLETED_EXIT


def configure_tensorflow(config: TrainConfig, cache: CompileCache | None = None) -> None:
    """XLA's compilation cache, thread pools, determinism, the Keras dtype policy: all before the first TF op runs."""
    import keras
    import tensorflow as tf

    if cache is not None:
        cache.export()
    t = config.train
    if t.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(t.intra_op_threads)
    if t.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(t.inter_op_threads)
    keras.mixed_precision.set_dtype_policy({"fp32": "float32"}.get(t.precision, t.precision))
    tf.config.experimental.enable_tensor_float_32_execution(t.tf32)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()


class _WarmupSchedule:
    """Linear warm-up from peak/warmup to `peak` over `warmup` updates, then constant."""

    def __new__(cls, peak: float, warmup: int):
        import keras

        class Warmup(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                from keras import ops

                if warmup <= 0:
                    return ops.convert_to_tensor(peak, "float32")
                ramp = (ops.cast(step, "float32") + 1.0) / float(warmup)
                return peak * ops.minimum(1.0, ramp)

            def get_config(self):
                return {"peak": peak, "warmup": warmup}

        return Warmup()


def make_optimizer(config: TrainConfig, replicas: int):
    import keras

    lr = _WarmupSchedule(config.scaled_learning_rate(replicas), config.train.warmup_steps)
    name = config.train.optimizer
    if name == "adam":
        opt = keras.optimizers.Adam(learning_rate=lr)
    elif name == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    else:
        opt = keras.optimizers.Lamb(learning_rate=lr)
    if config.train.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _as_targets(spec, y):
    """The pipeline's targets as the mapping `spec.loss` expects (a bare tensor is the spec's only target)."""
    keys = list(spec.targets.shapes)
    if isinstance(y, dict):
        missing = [k for k in keys if k not in y]
        if missing:
            raise ConfigError(f"model {spec.name} needs targets {missing} that the data pipeline does not provide")
        return y
    if len(keys) != 1:
        raise ConfigError(f"model {spec.name} needs targets {keys}; the data pipeline provides one tensor")
    return {keys[0]: y}


def build_step(model, optimizer, spec, backend: backends.Backend, grad_accum: int, xla: bool) -> Callable:
    """The training step, traced once per chunk shape: `step(chunk, n_steps, stop) -> (losses[n], stops)`."""
    import tensorflow as tf

    variables = model.trainable_variables

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = tf.cast(spec.loss(y, pred), tf.float32)
            if model.losses:
                loss += tf.add_n([tf.cast(v, tf.float32) for v in model.losses])
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        return loss, [tf.convert_to_tensor(g) for g in grads]

    # Under XLA the forward/backward pass is one compiled cluster. Without XLA it stays part of the step's
    # graph: a nested tf.function would release all gradients at once, when the last one is computed,
    # which rules out overlapping a gradient's exchange with the rest of the backward pass.
    if xla:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def one_step(chunk, i):
        x, y = chunk[0], _as_targets(spec, chunk[1])

        def micro(j):
            index = i * grad_accum + j
            return x[index], tf.nest.map_structure(lambda t: t[index], y)

        loss, grads = forward_backward(*micro(0))
        # Without accumulation no loop: a while loop releases its outputs together, which would hold
        # every gradient's exchange back until the last one exists (no overlap with the backward pass).
        if grad_accum > 1:
            for j in tf.range(1, grad_accum):
                more_loss, more = forward_backward(*micro(j))
                loss += more_loss
                grads = [a + b for a, b in zip(grads, more)]
        inv = 1.0 / grad_accum
        grads = backend.prepare_gradients([g * tf.cast(inv, g.dtype) for g in grads])
        optimizer.apply_gradients(zip(grads, variables))
        return loss * inv

    @tf.function
    def step(chunk, n_steps, stop):
        losses = tf.TensorArray(tf.float32, size=n_steps)
        for i in tf.range(n_steps):
            losses = losses.write(i, backend.reduce_mean(backend.run(one_step, (chunk, i))))
        stops = backend.reduce_sum(backend.run(tf.identity, (stop,)))
        return losses.stack(), stops

    return step


def _chunks(micro, per_replica_calls: int, local_replicas: int, grad_accum: int, skip_steps: int, steps: int):
    """Micro-batches -> one element per local replica per call, `[c * grad_accum, batch, ...]`, c <= per_replica_calls.

    Micro-batch order within a step: replica 0's `grad_accum` micro-batches, then replica 1's, ...
    """
    import tensorflow as tf

    per_step = local_replicas * grad_accum
    data = micro.skip(skip_steps * per_step).take(steps * per_step)
    data = data.batch(grad_accum, drop_remainder=True).batch(local_replicas, drop_remainder=True)
    data = data.batch(per_replica_calls)  # [c, R, k, B, ...]

    def regroup(*element):
        def one(t):
            shape = tf.shape(t)
            t = tf.transpose(t, tf.concat([[1, 0], tf.range(2, tf.rank(t))], 0))  # [R, c, k, B, ...]
            return tf.reshape(t, tf.concat([[shape[1], shape[0] * shape[2]], shape[3:]], 0))

        return tf.nest.map_structure(one, element)

    return data.map(regroup).unbatch().prefetch(local_replicas)


@dataclasses.dataclass
class _Data:
    dataset: Any
    train_plan: Any
    eval_tiles: np.ndarray
    task: str


def _prepare_data(config: TrainConfig) -> _Data:
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.data.pipeline import task_plan

    d = config.data
    ds = open_dataset(d.dataset)
    used = len(ds.images) if d.max_images is None else min(d.max_images, len(ds.images))
    n_train = used - d.eval_images
    if n_train < 1:
        raise ConfigError(f"data.eval_images={d.eval_images} leaves no training image of the {used} used in {d.dataset}")
    plan = task_plan(ds, config.model.name, d.patch, d.stride, d.border)
    image = plan.tiles[:, 0]
    train_plan = dataclasses.replace(plan, tiles=plan.tiles[image < n_train])
    if len(train_plan) == 0:
        raise ConfigError(f"no training tiles: the first {n_train} images of {d.dataset} hold no {d.patch}-pixel patch")
    return _Data(ds, train_plan, plan.tiles[(image >= n_train) & (image < used)], config.model.name)


def _localize(config: TrainConfig, data: _Data, world_size: int, rank: int) -> _Data:
    """Stage this rank's files and/or build its pre-tiled cache (data.stage_dir, data.tile_cache).

    Both cover what this rank reads: its training tiles (all of them, or under `locality` its own
    images' tiles, which stay this rank's in every epoch) and the held-out tiles. The returned data set
    reads bitwise what the original reads, so training gives the same batches.
    """
    from cellavie_hpc.data.sharding import shard
    from cellavie_hpc.data.staging import resolve_stage_dir, stage_dataset
    from cellavie_hpc.data.tile_cache import TileCache

    d, ds, plan = config.data, data.dataset, data.train_plan
    if d.stage_dir is None and d.tile_cache is None:
        return data
    mine = plan.tiles
    if d.locality:
        own = shard(plan, world_size, rank, 0, config.run.seed, remainder=d.remainder, locality=True).images()
        mine = plan.tiles[np.isin(plan.images, own)]
    needed = np.concatenate([mine, data.eval_tiles])
    if d.stage_dir is not None:
        ds, report = stage_dataset(ds, needed, d.stage_dir, d.stage_budget_bytes, task=data.task, progress=rank == 0)
        print(report.line(), file=sys.stderr)
    if d.tile_cache is not None:
        name = f"{data.task}-p{d.patch}" + (f"-w{world_size}-r{rank}" if d.locality else "") + ".tiles"
        ds = TileCache.build(resolve_stage_dir(d.tile_cache) / name, ds, needed, data.task, d.patch,
                             progress=rank == 0).view(ds)
    return dataclasses.replace(data, dataset=ds)


def _pipeline(config: TrainConfig, data: _Data, tiles: np.ndarray, batch: int, epoch: int, augment: bool, spec, *,
              balanced: bool = False, drop_remainder: bool = True):
    from cellavie_hpc.data.pipeline import build_pipeline

    d = config.data
    return build_pipeline(data.dataset, tiles, data.task, batch, d.patch, spec=spec, cache=d.cache,
                          shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch, parallel_reads=d.parallel_reads,
                          augment=augment, defocus_jitter_m=d.defocus_jitter_um * 1e-6 if augment else 0.0,
                          seed=config.run.seed, epoch=epoch, balanced=balanced,
                          drop_remainder=drop_remainder)


def _training_pipeline(config: TrainConfig, data: _Data, tiles: np.ndarray, batch: int, epoch: int, augment: bool,
                       spec):
    """The batches training steps see: classifier crops resampled to balanced classes (infected cells are a few %).

    BatchNorm recalibration must draw from this same distribution: the weights were fitted to features normalised
    with its batch statistics, and statistics of natural (~95 % healthy) batches shift every crop towards
    "infected" (held-out specificity 0.98 -> 0.51 in the d12 reproduction, docs/models.rst).
    """
    return _pipeline(config, data, tiles, batch, epoch, augment, spec, balanced=data.task == "classifier")


def evaluate(model, spec, config: TrainConfig, data: _Data, batch: int) -> dict[str, float]:
    """Model metrics over the held-out tiles (all of them, in order, last partial batch included)."""
    import tensorflow as tf

    if len(data.eval_tiles) == 0:
        return {}
    predict = tf.function(lambda x: model(x, training=False))
    batches = []
    for x, y in _pipeline(config, data, data.eval_tiles, batch, 0, False, spec, drop_remainder=False):
        batches.append(spec.metrics(_as_targets(spec, y), predict(x)))
    return {k: float(v) for k, v in spec.reduce_metrics(batches).items()}


def _write_rank_weights(run_dir: Path, rank: int, model) -> Path:
    """Every rank's final weights (to check that replicas agree)."""
    folder = run_dir / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{rank:05d}.npz"
    np.savez(path, **{f"{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)})
    return path


class _Startup:
    """Where the time from process start to the end of the first step goes (seconds, `startup_s` of the final record).

    `import`: process start until `train()` runs (interpreter, TensorFlow and package imports);
    `backend`: setting up the distribution back-end (hvd.init, the cluster's collectives);
    `build`: model, optimiser, checkpoint restore and the broadcast of the variables;
    `data`: opening the data set, planning tiles and waiting for the first batch;
    `first_step`: the first call of the step (tracing, compilation, one step); `total`: all of it.
    """

    def __init__(self) -> None:
        import psutil

        self.process_start_unix = psutil.Process().create_time()
        self.times: dict[str, float] = {"import": time.time() - self.process_start_unix}
        self._mark = time.perf_counter()

    def lap(self, part: str) -> None:
        """Add the time since the previous lap to `part`."""
        now = time.perf_counter()
        self.times[part] = self.times.get(part, 0.0) + now - self._mark
        self._mark = now

    def first_step_done(self) -> None:
        self.lap("first_step")
        self.times["total"] = time.time() - self.process_start_unix

    def as_record(self) -> dict[str, float] | None:
        return dict(self.times) if "total" in self.times else None


class _Progress:
    """Rank 0's progress line: step, epoch, loss, global samples/s, ETA."""

    def __init__(self, first: int, total: int, every: int, stream: TextIO | None, world_size: int):
        self.first, self.total, self.every, self.stream, self.world = first, total, every, stream, world_size
        self.start = time.perf_counter()
        self.samples = 0
        self.wall = 0.0

    def update(self, step: int, epoch: int, loss: float, samples: int, wall_s: float) -> None:
        self.samples += samples
        self.wall += wall_s
        if self.stream is None or (step + 1) % self.every and step + 1 != self.total:
            return
        rate = self.samples * self.world / self.wall if self.wall > 0 else math.nan
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, step + 1 - self.first) * (self.total - step - 1)
        self.stream.write(f"cellavie train: step {step + 1}/{self.total} epoch {epoch} loss {loss:.5f} "
                          f"{rate:.1f} samples/s eta {eta:.0f}s\n")
        self.stream.flush()


def train(config: TrainConfig, run_dir: str | Path, *, resume: str = "auto",
          progress: TextIO | None = sys.stderr) -> TrainResult:
    """Train `config` into `run_dir` as this process's rank; resumes from the latest checkpoint with `auto`.

    Writes `records/rank-XXXXX.jsonl` (every rank), `config.yaml`, checkpoints, `metrics.json` and
    `model.weights.h5` (rank 0). On an exception the final record says `failed` and the error re-raises.
    """
    if resume not in ("auto", "never"):
        raise ConfigError(f"--resume must be auto or never, got {resume!r}")
    run_dir = Path(run_dir)
    startup = _Startup()
    t = config.train
    cache = CompileCache(t.compile_cache_dir) if t.compile_cache_dir is not None else None
    job = job_env.detect()
    try:
        configure_tensorflow(config, cache)
        return _start(config, run_dir, resume, job, startup, progress, cache)
    finally:
        if cache is not None:
            cache.close()


def _start(config: TrainConfig, run_dir: Path, resume: str, job, startup: _Startup, progress: TextIO | None,
           cache: CompileCache | None) -> TrainResult:
    """Back-end, run folder and records; then `_train`, whose failure is written as a `failed` final record."""
    t = config.train
    if t.horovod.timeline:
        run_dir.mkdir(parents=True, exist_ok=True)  # Horovod opens the timeline file in hvd.init()
    backend = backends.create(t.backend, job, compression=t.allreduce_compression, cpu_replicas=t.cpu_replicas,
                              port_base=t.port_base, horovod_exchange=t.horovod.exchange,
                              horovod_environment=t.horovod.environment(run_dir))
    startup.lap("backend")
    if resume == "never" and (previous_attempts(run_dir, backend.rank) or checkpoint.latest(run_dir)):
        raise UserError(f"{run_dir} already holds records or checkpoints of a run; use --resume auto to continue "
                        "it or choose a fresh --run-dir")
    rank0 = backend.rank == 0
    digest = config_hash(config)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(as_mapping(config), sort_keys=False))
    recorder = RunRecorder(run_dir, backend.rank, t.log_every)
    try:
        return _train(config, run_dir, resume, job, backend, recorder, digest, progress if rank0 else None, startup,
                      cache)
    except BaseException as err:
        recorder.flush(*environment.peak_memory())
        text = "".join(traceback.format_exception_only(type(err), err)).strip()
        recorder.final("failed", recorder.steps, recorder.samples, {}, error=text, startup_s=startup.as_record())
        raise
    finally:
        recorder.close()


def _train(config: TrainConfig, run_dir: Path, resume: str, job, backend: backends.Backend,
           recorder: RunRecorder, digest: str, progress: TextIO | None, startup: _Startup,
           cache: CompileCache | None) -> TrainResult:
    import keras
    import tensorflow as tf

    from cellavie_hpc.data.sharding import shard
    from cellavie_hpc.models.flops import flops_per_sample
    from cellavie_hpc.models.registry import build_model, model_spec

    t, d = config.train, config.data
    rank0 = backend.rank == 0
    keras.utils.set_random_seed(config.run.seed)
    data = _prepare_data(config)
    startup.lap("data")
    in_channels = 2 * data.dataset.angles if config.model.name == "refocus" else 1
    spec = model_spec(config.model.name, config.model.preset, d.patch, in_channels, **config.model.options)
    batch = config.per_replica_batch(backend.replicas)
    k, local = t.grad_accum, backend.local_replicas
    tiles_per_step = batch * local * k  # this process, one optimiser update

    with backend.scope():
        model = build_model(config.model.name, config.model.preset, d.patch, in_channels, **config.model.options)
        if config.model.freeze_batchnorm:
            for layer in model._flatten_layers():
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False
        optimizer = make_optimizer(config, backend.replicas)
        optimizer.build(model.trainable_variables)
    position = checkpoint.Position()
    latest = checkpoint.latest(run_dir) if resume == "auto" else None
    if latest is not None:
        position = checkpoint.load(latest, model.variables, optimizer.variables, digest)
    backend.broadcast_variables(list(model.variables) + list(optimizer.variables))
    startup.lap("build")

    data = _localize(config, data, backend.world_size, backend.rank)
    startup.lap("data")
    steps_per_epoch = len(shard(data.train_plan, backend.world_size, backend.rank, 0, config.run.seed,
                                remainder=d.remainder, locality=d.locality)) // tiles_per_step
    if steps_per_epoch < 1:
        raise ConfigError(
            f"one step needs {tiles_per_step} tiles per process (batch {batch} x {local} replicas x grad_accum {k}) "
            f"but a process gets {len(data.train_plan) // backend.world_size} of {d.dataset}'s training tiles; "
            "lower the batch or use more images"
        )
    total_steps = t.steps if t.steps is not None else t.epochs * steps_per_epoch
    samples_per_step = tiles_per_step
    recorder.header(
        run_id=config.run.name, point=config.run.point, model=config.model.name, backend=backend.name,
        world_size=backend.world_size, rank=backend.rank, local_rank=job.local_rank, nodes=job.nodes, node=job.node,
        slurm=job.slurm_ids(), device=environment.device(), versions=environment.versions(),
        git_commit=environment.git_commit(), config_hash=digest, config=as_mapping(config),
        flops_per_sample=flops_per_sample(model), per_replica_batch=batch,
        global_batch=config.global_batch(backend.replicas), samples_per_epoch=steps_per_epoch * tiles_per_step,
        warmup_steps=t.warmup_record_steps, replicas=backend.replicas, grad_accum=k,
        steps_per_execution=t.steps_per_execution, resumed_from_step=position.step,
        process_start_unix=startup.process_start_unix,
        gradient_bytes=sum(backends.gradient_bytes(model.trainable_variables, t.allreduce_compression)),
        horovod_environment=t.horovod.environment(run_dir) if backend.name == "horovod" else None,
        learning_rate=config.scaled_learning_rate(backend.replicas),
        compile_cache=None if cache is None else {"dir": str(cache.folder), "entries": cache.found},
    )

    step_fn = build_step(model, optimizer, spec, backend, k, t.xla)
    probe = backend.exchange_probe([v.shape for v in model.trainable_variables]) if t.measure_exchange else None
    board = tf.summary.create_file_writer(str(run_dir / "tensorboard")) if t.tensorboard and rank0 else None
    bar = _Progress(position.step, total_steps, t.progress_every, progress, backend.world_size)
    profiling = False
    status = "completed"
    last_loss = math.nan
    first_call = True
    startup.lap("build")  # the header and the step's definition

    with StopRequest() as stop:
        while position.step < total_steps and status == "completed":
            epoch, begin = position.epoch, position.step_in_epoch
            steps = min(steps_per_epoch - begin, total_steps - position.step)
            tiles = shard(data.train_plan, backend.world_size, backend.rank, epoch, config.run.seed,
                          remainder=d.remainder, locality=d.locality).tiles
            micro = _training_pipeline(config, data, tiles, batch, epoch, d.augment, spec)
            iterator = iter(backend.distribute(
                lambda: _chunks(micro, t.steps_per_execution, local, k, begin, steps)))
            epoch_start, epoch_losses = time.perf_counter(), []
            done = 0
            if first_call:
                startup.lap("data")
            while done < steps:
                if t.profile_steps and rank0 and not profiling and position.step >= t.profile_steps[0] \
                        and position.step < t.profile_steps[1]:
                    tf.profiler.experimental.start(str(run_dir / "profile"))
                    profiling = True
                t0 = time.perf_counter()
                chunk = next(iterator)
                t1 = time.perf_counter()
                if first_call:
                    startup.lap("data")
                n = int(backend.local_values(tf.nest.flatten(chunk)[0])[0].shape[0]) // k
                losses, stops = step_fn(chunk, tf.constant(n, tf.int32), tf.constant(float(stop.requested)))
                losses = losses.numpy()
                t2 = time.perf_counter()
                if first_call:
                    startup.first_step_done()
                    first_call = False
                    if cache is not None and cache.publish() == 0 and cache.found == 0 and t.xla:
                        print(f"cellavie train: warning: XLA compiled nothing into {cache.folder}: TensorFlow "
                              "ran an op before train() set TF_XLA_FLAGS (the cache works from a fresh process)",
                              file=sys.stderr)
                exchange = None
                if probe is not None:
                    probe()
                    exchange = time.perf_counter() - t2
                mem, source = environment.peak_memory()
                for i, loss in enumerate(losses.tolist()):
                    recorder.step(position.step + i, epoch, wall_s=(t2 - t0) / n, input_wait_s=(t1 - t0) / n,
                                  compute_s=(t2 - t1) / n, exchange_s=exchange, samples=samples_per_step,
                                  loss=loss, mem_peak_bytes=mem, mem_source=source)
                    bar.update(position.step + i, epoch, loss, samples_per_step, (t2 - t0) / n)
                if not all(map(math.isfinite, losses.tolist())) and t.precision != "mixed_float16":
                    raise FloatingPointError(f"loss became {losses.tolist()} at step {position.step + n}: lower "
                                             "train.learning_rate or add warm-up (train.warmup_steps)")
                epoch_losses.extend(losses.tolist())
                last_loss = float(losses[-1])
                before = position.step
                done += n
                position = checkpoint.Position(position.step + n, epoch, begin + done)
                if board is not None:
                    with board.as_default(step=position.step):
                        tf.summary.scalar("loss", last_loss)
                        tf.summary.scalar("samples_per_s", samples_per_step * backend.world_size * n / (t2 - t0))
                if profiling and position.step >= t.profile_steps[1]:
                    tf.profiler.experimental.stop()
                    profiling = False
                if float(stops) > 0:
                    status = "preempted"
                    break
                if t.checkpoint_every and position.step // t.checkpoint_every > before // t.checkpoint_every \
                        and position.step < total_steps:
                    _checkpoint(run_dir, position, model, optimizer, digest, rank0, backend)
            recorder.flush(*environment.peak_memory())
            if position.step_in_epoch == steps_per_epoch or status == "completed":
                recorder.epoch(epoch, position.step_in_epoch, position.step_in_epoch * samples_per_step,
                               time.perf_counter() - epoch_start,
                               {"loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan})
            if position.step_in_epoch == steps_per_epoch:
                position = checkpoint.Position(position.step, epoch + 1, 0)
    if profiling:
        tf.profiler.experimental.stop()
    if status == "completed" and not config.model.freeze_batchnorm:
        _recalibrate(config, data, model, spec, backend, batch)
    _checkpoint(run_dir, position, model, optimizer, digest, rank0, backend)
    if t.rank_weights:
        _write_rank_weights(run_dir, backend.rank, model)
    metrics: dict[str, float] = {"train_loss": last_loss}
    if status == "completed" and rank0:
        metrics.update(evaluate(model, spec, config, data, batch))
        finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN
        (run_dir / "metrics.json").write_text(json.dumps(finite, indent=2) + "\n")
        model.save_weights(run_dir / "model.weights.h5")
    recorder.final(status, position.step, position.step * samples_per_step, metrics, startup_s=startup.as_record())
    if progress is not None:
        progress.write(f"cellavie train: {status} at step {position.step}; "
                       + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + "\n")
    return TrainResult(status, position.step, metrics, recorder.path, backend.rank, backend.world_size)


def _recalibrate(config: TrainConfig, data: _Data, model, spec, backend: backends.Backend, batch: int) -> None:
    """BatchNorm moving statistics recomputed with the final weights (at most 32 batches of this rank's epoch-0 shard).

    During training they trail the weights (an average over earlier steps), which hurts evaluation.
    Each rank uses its own shard; `_checkpoint` then averages the statistics over the ranks, so every
    rank ends with the same values. Frozen BatchNorm is left alone: training used those statistics.
    """
    from cellavie_hpc.models.normalization import recalibrate_batchnorm

    recalibrate_batchnorm(model, (x for x, _ in _recalibration_batches(config, data, spec, backend.world_size,
                                                                       backend.rank, batch)))


def _recalibration_batches(config: TrainConfig, data: _Data, spec, world_size: int, rank: int, batch: int):
    """Up to 32 un-augmented training batches of this rank's epoch-0 shard, drawn like training's batches."""
    from cellavie_hpc.data.sharding import shard

    d = config.data
    tiles = shard(data.train_plan, world_size, rank, 0, config.run.seed, remainder=d.remainder,
                  locality=d.locality).tiles
    return _training_pipeline(config, data, tiles, batch, 0, False, spec).take(32)


def _checkpoint(run_dir: Path, position, model, optimizer, digest: str, rank0: bool, backend) -> None:
    """Rank 0 writes; the others wait so that no rank exits (or is requeued) before the checkpoint exists.

    Non-trainable state (BatchNorm moving statistics) is first averaged over processes, so the
    checkpoint, the final weights and every rank's copy agree.
    """
    backend.average_variables(model.non_trainable_variables)
    if rank0:
        checkpoint.save(run_dir, position, model.variables, optimizer.variables, digest)
    backend.barrier()
