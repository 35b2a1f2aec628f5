"""The training configuration: the YAML contract every Slurm task reads, as frozen dataclasses.

Four sections, every key validated by type (`cellavie_hpc.config.from_mapping`) and by value here, so
that `batch_per_replica: 0` or `patch: 100` fails on the login node, naming the key, instead of an
hour later inside a job. `resolve()` turns the mapping plus command-line overrides into a
`TrainConfig`; `config_hash()` is the fingerprint written into every record header and checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Literal

from cellavie_hpc.config import apply_overrides, from_mapping, load_yaml, to_mapping
from cellavie_hpc.errors import ConfigError

#: Patches must be divisible by the deepest down-sampling of the models (U-Net: 2**4).
PATCH_MULTIPLE = 16
BACKENDS = ("single", "mirrored", "multiworker", "horovod")


def _require(condition: bool, key: str, value: Any, what: str) -> None:
    if not condition:
        raise ValueError(f"'{key}' must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Identity of a run: its name, the seed of every random choice, and the sweep point it measures."""

    name: str = "run"
    seed: int = 0
    point: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", self.name, "a non-empty string")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where tiles come from and how the input pipeline feeds them (see data/tiling, data/sharding, data/pipeline).

    The last `eval_images` images of the data set are held out of training and used for the
    evaluation metrics written after training. `stage_dir` (a node-local folder such as `$TMPDIR` or
    /dev/shm; null reads in place) copies the files this rank reads there first, at most
    `stage_budget_bytes` per rank (null: free space only); `tile_cache` (a node-local folder; null: none)
    pre-tiles this rank's windows into one file there (see docs/data_at_scale.rst). With `augment`, the
    refocus model's inputs are also propagated by a random known distance of up to
    `defocus_jitter_um` micrometres (its focus target moves with them).
    """

    dataset: str
    patch: int = 128
    stride: int | None = None
    border: Literal["drop", "reflect"] = "drop"
    remainder: Literal["pad", "drop"] = "pad"
    locality: bool = False
    shuffle_buffer: int = 0
    cache: bool = False
    prefetch: int = -1
    parallel_reads: int = -1
    augment: bool = False
    defocus_jitter_um: float = 0.0
    max_images: int | None = None
    eval_images: int = 1
    stage_dir: str | None = None
    stage_budget_bytes: int | None = None
    tile_cache: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.dataset.strip()), "dataset", self.dataset, "the path of a data set")
        _require(self.patch > 0 and self.patch % PATCH_MULTIPLE == 0, "patch", self.patch,
                 f"a positive multiple of {PATCH_MULTIPLE} (pixels)")
        _require(self.stride is None or self.stride > 0, "stride", self.stride, "null (= patch) or a positive integer")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", self.shuffle_buffer, "an integer >= 0 (0: no buffer)")
        _require(self.prefetch == -1 or self.prefetch >= 0, "prefetch", self.prefetch, "-1 (autotune) or >= 0")
        _require(self.parallel_reads == -1 or self.parallel_reads >= 1, "parallel_reads", self.parallel_reads,
                 "-1 (autotune) or >= 1")
        _require(self.max_images is None or self.max_images >= 2, "max_images", self.max_images,
                 "null or >= 2 (at least one training and one evaluation image)")
        _require(self.eval_images >= 0, "eval_images", self.eval_images, "an integer >= 0")
        _require(0 <= self.defocus_jitter_um < 1e6, "defocus_jitter_um", self.defocus_jitter_um,
                 "a distance >= 0 in micrometres (0: no jitter)")
        _require(self.stage_budget_bytes is None or self.stage_budget_bytes >= 0, "stage_budget_bytes",
                 self.stage_budget_bytes, "null (free space only) or bytes >= 0")
        _require(self.tile_cache is None or not self.cache, "tile_cache", self.tile_cache,
                 "null when cache is true (both keep decoded tiles; choose one)")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train; `options` override fields of the preset (checked by models/registry).

    `freeze_batchnorm` runs every BatchNormalization layer on its moving statistics with fixed scale
    and offset: each sample is then computed independently of the others in its batch, so results no
    longer depend on how a batch is split over replicas or micro-batches (tiny per-replica batches,
    exact equivalence checks).
    """

    name: Literal["refocus", "unet", "detector", "classifier"]
    preset: Literal["tiny", "base"] = "tiny"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    freeze_batchnorm: bool = False


@dataclasses.dataclass(frozen=True)
class HorovodSection:
    """Horovod's gradient exchange, exported as `HOROVOD_*` variables before `hvd.init()` reads them.

    `exchange`: `grouped` all-reduces every gradient in one grouped call after the backward pass;
    `per_tensor` all-reduces each gradient as soon as the backward pass produces it (what
    `hvd.DistributedGradientTape` does), so the exchange can overlap the rest of the backward pass and
    Horovod's tensor fusion (`fusion_threshold_bytes`, `cycle_time_ms`; null keeps Horovod's defaults,
    128 MiB and 1 ms; `backends.propose_fusion_threshold` suggests one from the gradients' sizes) decides how tensors are batched. `hierarchical_allreduce` reduces within each node
    first, then across nodes (a no-op on one node). `timeline` writes Horovod's Chrome trace to
    `RUN_DIR/horovod_timeline.json` (read it with `cellavie_hpc.report.timeline`).
    """

    exchange: Literal["grouped", "per_tensor"] = "grouped"
    fusion_threshold_bytes: int | None = None
    cycle_time_ms: float | None = None
    hierarchical_allreduce: bool = False
    timeline: bool = False

    def __post_init__(self) -> None:
        _require(self.fusion_threshold_bytes is None or self.fusion_threshold_bytes >= 0, "fusion_threshold_bytes",
                 self.fusion_threshold_bytes, "null (Horovod's default) or bytes >= 0 (0: no fusion)")
        _require(self.cycle_time_ms is None or self.cycle_time_ms > 0, "cycle_time_ms", self.cycle_time_ms,
                 "null (Horovod's default) or milliseconds > 0")

    def environment(self, run_dir: str | Path) -> dict[str, str]:
        """The `HOROVOD_*` variables these settings mean (only those that differ from Horovod's defaults)."""
        env = {}
        if self.fusion_threshold_bytes is not None:
            env["HOROVOD_FUSION_THRESHOLD"] = str(self.fusion_threshold_bytes)
        if self.cycle_time_ms is not None:
            env["HOROVOD_CYCLE_TIME"] = repr(float(self.cycle_time_ms))
        if self.hierarchical_allreduce:
            env["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1"
        if self.timeline:
            env["HOROVOD_TIMELINE"] = str(Path(run_dir) / "horovod_timeline.json")
        return env


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """How to train: back-end, batch, schedule, precision and what to record.

    A *step* is one optimiser update; it consumes `grad_accum` micro-batches of `batch_per_replica`
    tiles on every replica. Training runs `steps` steps when given, else `epochs` epochs.
    Beyond the common contract: `measure_exchange` times a separate all-reduce of the gradients'
    sizes after each call (exchange_s); `deterministic` enables TF op determinism (bitwise resume);
    `rank_weights` writes every rank's final weights to RUN_DIR/weights/; `cpu_replicas` splits the
    CPU into logical devices for `mirrored` without GPUs; `port_base` is the first port of
    `multiworker` under Slurm; `*_op_threads` 0 leaves TF's choice; `horovod` tunes Horovod's exchange
    (`HorovodSection`). `tf32` allows TensorFloat-32 matmuls and convolutions on Ampere and later GPUs;
    off by default so that `fp32` means IEEE float32 (TensorFlow itself turns TF32 on); no effect on CPUs.
    `reference_batch` (null: scale by the replica count) is the global batch at which `learning_rate`
    holds: `lr_scaling` then follows the global batch, so one setting serves every back-end, split and
    accumulation. `compile_cache_dir` (null: none; `$VARS` expanded) keeps XLA's compiled clusters on disk
    for the next run with the same model and shapes (see `compile_cache.py`).
    """

    backend: Literal["single", "mirrored", "multiworker", "horovod"] = "single"
    batch_per_replica: int = 8
    global_batch: int | None = None
    steps: int | None = None
    epochs: int = 1
    learning_rate: float = 1e-3
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int | None = None
    warmup_steps: int = 0
    optimizer: Literal["adam", "sgd", "lamb"] = "adam"
    precision: Literal["fp32", "mixed_float16", "mixed_bfloat16"] = "fp32"
    tf32: bool = False
    xla: bool = False
    compile_cache_dir: str | None = None
    steps_per_execution: int = 1
    grad_accum: int = 1
    checkpoint_every: int = 0
    log_every: int = 1
    warmup_record_steps: int = 2
    tensorboard: bool = False
    profile_steps: tuple[int, int] | None = None
    allreduce_compression: Literal["none", "fp16", "bf16"] = "none"
    measure_exchange: bool = False
    deterministic: bool = False
    rank_weights: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    cpu_replicas: int = 1
    port_base: int = 8888
    progress_every: int = 10
    horovod: HorovodSection = dataclasses.field(default_factory=HorovodSection)

    def __post_init__(self) -> None:
        _require(self.batch_per_replica >= 1, "batch_per_replica", self.batch_per_replica, "a positive integer")
        _require(self.global_batch is None or self.global_batch >= 1, "global_batch", self.global_batch,
                 "null or a positive integer")
        _require(self.steps is None or self.steps >= 1, "steps", self.steps, "null (use epochs) or a positive integer")
        _require(self.epochs >= 1, "epochs", self.epochs, "a positive integer")
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        _require(self.reference_batch is None or self.reference_batch >= 1, "reference_batch", self.reference_batch,
                 "null (scale by the replica count) or a positive global batch")
        _require(self.compile_cache_dir is None or bool(self.compile_cache_dir.strip()), "compile_cache_dir",
                 self.compile_cache_dir, "null (no cache) or a folder")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.steps_per_execution >= 1, "steps_per_execution", self.steps_per_execution, "a positive integer")
        _require(self.grad_accum >= 1, "grad_accum", self.grad_accum, "a positive integer")
        _require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0 (0: never)")
        _require(self.log_every >= 1, "log_every", self.log_every, "a positive integer")
        _require(self.warmup_record_steps >= 0, "warmup_record_steps", self.warmup_record_steps, "an integer >= 0")
        if self.profile_steps is not None:
            a, b = self.profile_steps if len(self.profile_steps) == 2 else (-1, -1)
            _require(0 <= a < b, "profile_steps", self.profile_steps, "null or [first, last] steps with 0 <= first < last")
        _require(self.intra_op_threads >= 0, "intra_op_threads", self.intra_op_threads, "0 (TF's choice) or a positive integer")
        _require(self.inter_op_threads >= 0, "inter_op_threads", self.inter_op_threads, "0 (TF's choice) or a positive integer")
        _require(self.cpu_replicas >= 1, "cpu_replicas", self.cpu_replicas, "a positive integer")
        _require(1024 <= self.port_base <= 65000, "port_base", self.port_base, "a TCP port in 1024..65000")
        _require(self.progress_every >= 1, "progress_every", self.progress_every, "a positive integer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: DataSection
    model: ModelSection
    run: RunSection = dataclasses.field(default_factory=RunSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        _require(self.data.defocus_jitter_um == 0 or self.model.name == "refocus", "data.defocus_jitter_um",
                 self.data.defocus_jitter_um, "0 unless model.name is refocus (only its inputs are defocused fields)")
        _require(not (self.train.backend == "horovod" and self.train.allreduce_compression == "bf16"),
                 "train.allreduce_compression", self.train.allreduce_compression,
                 "none or fp16 with train.backend horovod (Horovod 0.28's allreduce has no bfloat16 kernel; "
                 "bf16 works with mirrored and multiworker)")

    def per_replica_batch(self, replicas: int) -> int:
        """Tiles per replica per micro-batch: `batch_per_replica`, or `global_batch` split over `replicas`."""
        if self.train.global_batch is None:
            return self.train.batch_per_replica
        if self.train.global_batch % replicas:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not divisible by the {replicas} replicas; "
                f"use a multiple of {replicas} or set train.batch_per_replica instead"
            )
        return self.train.global_batch // replicas

    def global_batch(self, replicas: int) -> int:
        """Samples per optimiser update over all replicas: per-replica batch x replicas x grad_accum."""
        return self.per_replica_batch(replicas) * replicas * self.train.grad_accum

    def scaled_learning_rate(self, replicas: int) -> float:
        """The peak learning rate after `lr_scaling` (linear or sqrt) by the replica count, or with
        `reference_batch` set by global batch / reference_batch."""
        t = self.train
        ratio = float(replicas) if t.reference_batch is None else self.global_batch(replicas) / t.reference_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[t.lr_scaling]
        return t.learning_rate * factor


def resolve(mapping: dict[str, Any], overrides: Iterable[str] = (), where: str = "config") -> TrainConfig:
    """Validate a configuration mapping after applying `key.sub=value` overrides."""
    data = apply_overrides(mapping, list(overrides))
    return from_mapping(TrainConfig, data, where)


def load(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read and validate a training YAML file; every error names the file and the key."""
    return resolve(load_yaml(path), overrides, where=str(path))


def as_mapping(config: TrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain data (what `RUN_DIR/config.yaml` and record headers hold)."""
    mapping = to_mapping(config)
    if mapping["train"]["profile_steps"] is not None:
        mapping["train"]["profile_steps"] = list(mapping["train"]["profile_steps"])
    return mapping


def config_hash(config: TrainConfig) -> str:
    """sha256 of the canonical JSON of the resolved configuration: equal configurations, equal hashes."""
    canonical = json.dumps(as_mapping(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
