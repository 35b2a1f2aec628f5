"""Sweeps: a YAML file that names every training run of a study, validated and expanded into points.

A sweep file holds `base:` (training-configuration defaults, the sections of `cellavie train`'s YAML),
`dataset:` (an existing data set, or the parameters to generate one once into the sweep directory),
`grid:` (one mapping or a list of mappings: the cartesian product of each axis' values) and/or
`points:` (an explicit list), and `cluster:` (partition, account, time limit, modules, GPUs, ...).
`variants:` names partial training configurations (improvement switches such as
`train.allreduce_compression`, `data.tile_cache`) that the `variant` axis applies on top of `base:` and
the point's axes; `baseline` (defined or not) is the reference the report compares each variant with.
Everything is checked before anything is submitted, so an impossible point (a multi-node `mirrored`
run, more GPUs than a node holds, a global batch that does not divide over the ranks) fails on the
login node with the key and the point named, not in the queue an hour later.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellavie_hpc.config import apply_overrides, from_mapping, load_yaml, suggest
from cellavie_hpc.errors import ConfigError

Backend = Literal["single", "mirrored", "multiworker", "horovod"]
ModelName = Literal["refocus", "unet", "detector", "classifier"]
Precision = Literal["fp32", "mixed_float16", "mixed_bfloat16"]
GpuRequest = Literal["gpus_per_node", "gres", "none"]

#: Back-ends that run one process (rank) per GPU; the others run one process per node.
RANK_PER_GPU = ("multiworker", "horovod")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The variant every other one is compared with; it needs no definition under `variants:` (none = no overrides).
BASELINE = "baseline"
#: Training-configuration sections a variant may set (`run:` is the sweep's: name, seed and point).
VARIANT_SECTIONS = ("data", "model", "train")


@dataclass(frozen=True)
class PointSpec:
    """The axes of a sweep point; None means "from `base:`" (or the default noted)."""

    study: str | None = None            # free label the report groups by, e.g. "strong", "weak"
    model: ModelName | None = None
    backend: Backend | None = None      # default: base train.backend, else single
    nodes: int | None = None            # default 1
    gpus_per_node: int | None = None    # default 1; ranks per node for multiworker/horovod
    batch_per_gpu: int | None = None    # per-replica batch (weak scaling: fixed per GPU)
    global_batch: int | None = None     # fixed global batch split over the replicas (strong scaling)
    patch: int | None = None            # tile side (pixels)
    images: int | None = None           # data-set size: images used (data.max_images)
    images_per_rank: int | None = None  # data-set size growing with the world size (weak scaling)
    precision: Precision | None = None
    xla: bool | None = None
    steps: int | None = None
    epochs: int | None = None
    repeats: int | None = None          # independent repetitions (default 1), seeds base+0, base+1, ...
    time_min: int | None = None         # Slurm time limit of this point (default cluster.time_min)
    variant: str | None = None          # a name under `variants:` (or `baseline`); default: none


AXES = tuple(f.name for f in dataclasses.fields(PointSpec))


def _grid_field(f: dataclasses.Field) -> tuple[str, Any, Any]:
    """A grid axis accepts a list of values (or one value) of the point axis' type."""
    inner = tuple(a for a in typing.get_args(typing.get_type_hints(PointSpec)[f.name]) if a is not type(None))
    scalar = typing.Union[inner] if len(inner) > 1 else inner[0]
    return f.name, typing.Optional[typing.Union[scalar, list[scalar]]], field(default=None)


#: The axes of a `grid:` mapping: each a list of values (one value = a list of one).
GridSpec = dataclasses.make_dataclass("GridSpec", [_grid_field(f) for f in dataclasses.fields(PointSpec)],
                                      frozen=True)


@dataclass(frozen=True)
class GenerateSpec:
    """Parameters of `cellavie generate`, run once into SWEEP_DIR/dataset before submitting."""

    images: int = 8
    size: int = 512
    parasitemia: float = 0.05
    seed: int = 0
    angles: int = 1

    def __post_init__(self) -> None:
        if self.images < 2 or self.size < 16 or not 0 <= self.parasitemia <= 1 or self.angles < 1:
            raise ValueError(f"needs images >= 2, size >= 16 (pixels), 0 <= parasitemia <= 1, angles >= 1; got {self}")


@dataclass(frozen=True)
class DatasetSpec:
    path: str | None = None
    generate: GenerateSpec | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.generate is None):
            raise ValueError("give exactly one of 'path' (an existing data set) or 'generate' (parameters)")
        if self.path is not None and ("\n" in self.path or not self.path.strip()):
            raise ValueError(f"'path' must be one line naming a data set, got {self.path!r}")


@dataclass(frozen=True)
class ContainerSpec:
    """Run every rank inside an Apptainer/Singularity image: `<runtime> exec [--nv] [--bind B] IMAGE <python>`."""

    image: str
    runtime: Literal["apptainer", "singularity"] = "apptainer"
    binds: tuple[str, ...] = ()
    nv: bool = True
    python: str = "python3"


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how the points run; every string here is validated before it reaches a script."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 30
    modules: tuple[str, ...] = ()           # `module load NAME` lines (names checked against a whitelist)
    setup: tuple[str, ...] = ()             # verbatim shell lines run before the ranks start (yours, not quoted)
    container: ContainerSpec | None = None
    array_parallelism: int = 64             # array tasks of one shape running at once
    gpus: GpuRequest = "gpus_per_node"      # --gpus-per-node=N, --gres=gpu:N, or no GPU request (CPU nodes)
    node_gpus: int | None = None            # GPUs per node of the partition, if declared: checked
    max_nodes: int | None = None            # nodes of the partition, if declared: checked
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    exclusive: bool = False
    mpi: str = "pmix"                       # srun --mpi plugin that gives Horovod its MPI world
    signal_delay_s: int = 90                # Slurm signals this long before the time limit: checkpoint, requeue
    max_requeue: int = 3                    # requeues after a time-out before a point counts as failed
    local_parallelism: int = 1              # points run at once by `--cluster local`

    def __post_init__(self) -> None:
        for key in ("time_min", "array_parallelism", "local_parallelism"):
            if getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be a positive integer, got {getattr(self, key)!r}")
        for key in ("node_gpus", "max_nodes", "cpus_per_task"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be null or a positive integer, got {getattr(self, key)!r}")
        if self.signal_delay_s < 10 or self.max_requeue < 0:
            raise ValueError("'signal_delay_s' must be >= 10 (seconds) and 'max_requeue' >= 0")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetSpec | None = None
    grid: Any = None                        # a GridSpec mapping, or a list of them
    points: tuple[PointSpec, ...] = ()
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"'name' must match {NAME_RE.pattern} (it names jobs and folders), got {self.name!r}")
        for name, overrides in self.variants.items():
            if not NAME_RE.match(name):
                raise ValueError(f"variants: name {name!r} must match {NAME_RE.pattern} (it names runs and folders)")
            unknown = [k for k in overrides if k not in VARIANT_SECTIONS]
            if unknown:
                raise ValueError(f"variants.{name}: unknown section '{unknown[0]}'"
                                 f"{suggest(unknown[0], VARIANT_SECTIONS)}; a variant sets keys of "
                                 f"{', '.join(VARIANT_SECTIONS)} (run.* belongs to the sweep)")
            for section, key in (("model", "name"), ("train", "backend")):
                if key in (overrides.get(section) or {}):
                    raise ValueError(f"variants.{name}: sets {section}.{key}, a point axis (it names the point "
                                     f"and its series); use the grid's '{section if section == 'model' else key}' axis")

    def variant_overrides(self, name: str | None) -> dict[str, Any]:
        """The training-configuration overrides of variant `name` (none for the baseline or no variant)."""
        return {} if name is None else self.variants.get(name, {})

    def grids(self, where: str) -> list[Any]:
        """The `grid:` section as a list of validated GridSpec."""
        raw = [] if self.grid is None else self.grid if isinstance(self.grid, list) else [self.grid]
        return [from_mapping(GridSpec, g, f"{where}: grid[{i}]" if isinstance(self.grid, list) else f"{where}: grid")
                for i, g in enumerate(raw)]


@dataclass(frozen=True)
class Point:
    """One run of the sweep: fully resolved axes (None: left to the training configuration)."""

    index: int
    study: str
    model: str
    backend: str
    nodes: int
    gpus_per_node: int
    batch_per_gpu: int | None
    global_batch: int | None
    patch: int | None
    images: int | None
    images_per_rank: int | None
    precision: str | None
    xla: bool | None
    steps: int | None
    epochs: int | None
    repeat: int
    time_min: int
    variant: str | None = None

    @property
    def world_size(self) -> int:
        """Replicas of the run: one per GPU (CPU device when the node has none)."""
        return self.nodes * self.gpus_per_node

    @property
    def dataset_images(self) -> int | None:
        """Images the run reads: `images`, or `images_per_rank` times the world size (weak scaling)."""
        return self.images_per_rank * self.world_size if self.images_per_rank is not None else self.images

    @property
    def tasks_per_node(self) -> int:
        """Slurm tasks (processes) per node: one per GPU for multiworker/horovod, else one."""
        return self.gpus_per_node if self.backend in RANK_PER_GPU else 1

    @property
    def ranks(self) -> int:
        """Processes writing a rank record file."""
        return self.nodes * self.tasks_per_node

    @property
    def id(self) -> str:
        """Stable, file-system safe name: `p003-horovod-unet-1x2-r0` (with a variant `...-1x2-fp16-r0`)."""
        shape = f"{self.nodes}x{self.gpus_per_node}" + ("" if self.variant is None else f"-{self.variant}")
        return f"p{self.index:03d}-{self.backend}-{self.model}-{shape}-r{self.repeat}"

    def mapping(self) -> dict[str, Any]:
        """The point as plain data: copied into run.point and from there into every record header.

        `variant` appears only when set, so that sweeps without variants keep their fingerprint."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not (f.name == "variant" and self.variant is None)}
        out.update(id=self.id, world_size=self.world_size, tasks_per_node=self.tasks_per_node)
        return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def sweep_mapping(path: str | Path, scale: str | None = None, overrides: typing.Iterable[str] = ()) -> dict[str, Any]:
    """The sweep file as plain data after `scale` (its `scales: {NAME: {...}}` entry merged over the file,
    lists replaced, mappings merged) and `overrides` (`key.sub=value` strings, applied last)."""
    raw = load_yaml(path)
    if scale is not None:
        scales = raw.get("scales") or {}
        if scale not in scales:
            known = ", ".join(sorted(scales)) or "none defined"
            raise ConfigError(f"{path}: no scale '{scale}' under 'scales:'{suggest(scale, scales)}; known: {known}")
        raw = _deep_merge({k: v for k, v in raw.items() if k != "scales"}, scales[scale])
    return apply_overrides(raw, list(overrides))


def load_sweep(path: str | Path, scale: str | None = None, overrides: typing.Iterable[str] = ()) -> SweepSpec:
    """Read and validate a sweep file (see `sweep_mapping` for `scale` and `overrides`)."""
    return from_mapping(SweepSpec, sweep_mapping(path, scale, overrides), str(path))


def _base_train(spec: SweepSpec) -> dict[str, Any]:
    return dict(spec.base.get("train") or {})


def _resolve(spec: SweepSpec, axes: PointSpec, index: int, repeat: int) -> Point:
    """The point's axes, falling back to `base:` so that the point (and every record header) is complete."""
    train = _base_train(spec)
    data = dict(spec.base.get("data") or {})
    model = axes.model or (spec.base.get("model") or {}).get("name")
    if model is None:
        raise ConfigError(f"point {index}: no model: set 'model' in the grid/points or base.model.name")
    global_batch, batch = axes.global_batch, axes.batch_per_gpu
    if global_batch is None and batch is None:
        global_batch = train.get("global_batch")
        batch = train.get("batch_per_replica") if global_batch is None else None
    steps, epochs = axes.steps, axes.epochs
    if steps is None and epochs is None:
        steps, epochs = train.get("steps"), train.get("epochs")
    images = axes.images if axes.images is not None or axes.images_per_rank is not None else data.get("max_images")
    return Point(
        index=index, study=axes.study or "default", model=model,
        backend=axes.backend or train.get("backend", "single"),
        nodes=1 if axes.nodes is None else axes.nodes,
        gpus_per_node=1 if axes.gpus_per_node is None else axes.gpus_per_node,
        batch_per_gpu=batch, global_batch=global_batch, patch=axes.patch or data.get("patch"),
        images=images, images_per_rank=axes.images_per_rank,
        precision=axes.precision or train.get("precision"),
        xla=axes.xla if axes.xla is not None else train.get("xla"),
        steps=steps, epochs=epochs, repeat=repeat, time_min=axes.time_min or spec.cluster.time_min,
        variant=axes.variant,
    )


def _axes_combinations(spec: SweepSpec, where: str) -> list[tuple[str, list[PointSpec]]]:
    """(origin, axes of each variant) for every grid combination, then every listed point, in file order.

    The axes of one entry differ only in `variant` (one entry of one without a variant axis)."""
    combos: list[tuple[str, list[PointSpec]]] = []
    for g, grid in enumerate(spec.grids(where)):
        label = f"grid[{g}]" if isinstance(spec.grid, list) else "grid"
        values = {}
        for name in AXES:
            value = getattr(grid, name)
            if value is None:
                continue
            value = value if isinstance(value, list) else [value]
            if not value:
                raise ConfigError(f"{where}: {label}.{name} is an empty list: the grid would have no points")
            values[name] = value
        if not values:
            raise ConfigError(f"{where}: {label} sets no axis; valid axes: {', '.join(AXES)}")
        variants = values.pop("variant", [None])
        for combo in itertools.product(*values.values()):
            combos.append((label, [PointSpec(**dict(zip(values, combo)), variant=v) for v in variants]))
    combos.extend((f"points[{i}]", [p]) for i, p in enumerate(spec.points))
    return combos


def _check_variant(spec: SweepSpec, name: str | None, where: str) -> None:
    if name is not None and name != BASELINE and name not in spec.variants:
        known = ", ".join([BASELINE, *sorted(spec.variants)])
        raise ConfigError(f"{where}: variant '{name}' is not defined under 'variants:'"
                          f"{suggest(name, [BASELINE, *spec.variants])}; known: {known}")


def expand(spec: SweepSpec, where: str = "sweep") -> list[Point]:
    """Every point of the sweep (repeats unrolled), each validated; ConfigError names the point and key.

    The variants of one grid combination run interleaved, repeat by repeat (baseline r0, fp16 r0, ...,
    baseline r1, ...), so that a drift of the machine's load hits them alike; without a variant axis the
    repeats of a point follow each other.
    """
    combos = _axes_combinations(spec, where)
    if not combos:
        raise ConfigError(f"{where}: the sweep has no points: add a 'grid:' or a 'points:' section")
    points: list[Point] = []
    for origin, variants in combos:
        repeats = 1 if variants[0].repeats is None else variants[0].repeats
        if repeats < 1:
            raise ConfigError(f"{where}: {origin}: 'repeats' must be >= 1, got {repeats}")
        for axes in variants:
            _check_variant(spec, axes.variant, f"{where}: {origin}")
        for r in range(repeats):
            for axes in variants:
                point = _resolve(spec, axes, len(points), r)
                check_point(spec, point, axes, f"{where}: {origin} -> point {point.index} ({point.id})")
                points.append(point)
    return points


def check_point(spec: SweepSpec, p: Point, axes: PointSpec, where: str) -> None:
    """Refuse a point that cannot run, naming the key: the rules of the back-ends and of the cluster."""
    def fail(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: '{key}': {why}")

    for key in ("nodes", "gpus_per_node", "batch_per_gpu", "global_batch", "patch", "images", "images_per_rank",
                "steps", "epochs", "time_min"):
        value = getattr(axes, key)
        if value is not None and value < 1:
            fail(key, f"must be a positive integer, got {value}")
    if p.backend == "single" and p.world_size != 1:
        fail("gpus_per_node", f"backend 'single' trains on one device; got nodes={p.nodes} x gpus_per_node="
                              f"{p.gpus_per_node} (use mirrored, multiworker or horovod for more)")
    if p.backend == "mirrored" and p.nodes != 1:
        fail("nodes", f"backend 'mirrored' runs in one process on one node; got nodes={p.nodes} "
                      "(use multiworker or horovod across nodes)")
    cluster = spec.cluster
    if cluster.node_gpus is not None and p.gpus_per_node > cluster.node_gpus:
        fail("gpus_per_node", f"{p.gpus_per_node} GPUs per node, but cluster.node_gpus declares {cluster.node_gpus}")
    if cluster.max_nodes is not None and p.nodes > cluster.max_nodes:
        fail("nodes", f"{p.nodes} nodes, but cluster.max_nodes declares {cluster.max_nodes}")
    if axes.batch_per_gpu is not None and axes.global_batch is not None:
        fail("global_batch", "set either batch_per_gpu (weak scaling) or global_batch (strong scaling), not both")
    global_batch = axes.global_batch
    if global_batch is None and axes.batch_per_gpu is None:
        global_batch = _base_train(spec).get("global_batch")
    if isinstance(global_batch, int) and global_batch % p.world_size:
        fail("global_batch", f"{global_batch} does not divide over {p.world_size} replicas "
                             f"(nodes={p.nodes} x gpus_per_node={p.gpus_per_node}); use a multiple of {p.world_size}")
    if axes.images is not None and axes.images_per_rank is not None:
        fail("images_per_rank", "set either images or images_per_rank, not both")
    if axes.steps is not None and axes.epochs is not None:
        fail("epochs", "set either steps or epochs, not both")
    if p.time_min * 60 <= cluster.signal_delay_s + 60:
        fail("time_min", f"{p.time_min} min leaves no time before the checkpoint signal "
                         f"(cluster.signal_delay_s={cluster.signal_delay_s} s)")


def training_config(spec: SweepSpec, point: Point, dataset: str | None) -> dict[str, Any]:
    """The `cellavie train` configuration of one point: `base:` with the point's axes applied, then its
    variant's overrides (`dataset`: the data-set path; None keeps base.data.dataset)."""
    cfg = copy.deepcopy(spec.base)
    run, data, model, train = (cfg.setdefault(k, {}) for k in ("run", "data", "model", "train"))
    run["name"] = point.id
    run["seed"] = int(run.get("seed", 0)) + point.repeat
    run["point"] = point.mapping()
    if dataset is not None:
        data["dataset"] = dataset
    if point.patch is not None:
        data["patch"] = point.patch
    if point.dataset_images is not None:
        data["max_images"] = point.dataset_images
    model["name"] = point.model
    train["backend"] = point.backend
    if point.batch_per_gpu is not None:
        train["batch_per_replica"] = point.batch_per_gpu
    train["global_batch"] = point.global_batch
    for key in ("precision", "xla", "steps", "epochs"):
        if getattr(point, key) is not None:
            train[key] = getattr(point, key)
    if point.steps is None:
        train["steps"] = None
    if point.backend == "mirrored":
        train["cpu_replicas"] = point.gpus_per_node  # CPU-only nodes: as many logical devices as GPUs asked
    return _deep_merge(cfg, spec.variant_overrides(point.variant))


@dataclass(frozen=True)
class Plan:
    """A validated sweep: its points, each point's training configuration, and a fingerprint."""

    spec: SweepSpec
    points: tuple[Point, ...]
    configs: tuple[dict[str, Any], ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over the points and their configurations: a sweep directory holds one sweep."""
        blob = json.dumps([p.mapping() for p in self.points], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def point(self, key: str | int) -> Point:
        """A point by index (`3`) or id (`p003-...`)."""
        for p in self.points:
            if str(key) in (str(p.index), p.id):
                return p
        raise ConfigError(f"sweep '{self.spec.name}' has no point {key!r}: indices 0..{len(self.points) - 1} "
                          f"or ids such as {self.points[0].id!r}")


def plan(spec: SweepSpec, dataset: str | None, where: str = "sweep") -> Plan:
    """Expand and validate the sweep, and build every point's training configuration.

    Each configuration is validated by the training engine's own loader when it is importable, so a typo
    in `base:` (e.g. `train.bach_size`) fails here, naming the point, before anything is submitted.
    """
    check_variants(spec, where)
    points = expand(spec, where)
    configs = []
    for point in points:
        cfg = training_config(spec, point, dataset)
        variant = f", variant '{point.variant}'" if point.variant is not None else ""
        _validate_training(cfg, f"{where}: point {point.index} ({point.id}){variant}", point.world_size)
        configs.append(cfg)
    return Plan(spec=spec, points=tuple(points), configs=tuple(configs))


def check_variants(spec: SweepSpec, where: str = "sweep") -> None:
    """Validate every defined variant over `base:`, used or not, so that a typo names the variant."""
    for name, overrides in spec.variants.items():
        cfg = _deep_merge(spec.base, overrides)
        cfg.setdefault("model", {}).setdefault("name", "unet")  # the model may come from the points' axes
        _validate_training(cfg, f"{where}: variants.{name}")


def _validate_training(cfg: dict[str, Any], where: str, world_size: int | None = None) -> None:
    """The training engine's own validation (and, given the world size, its split of the global batch)."""
    try:
        from cellavie_hpc.train.config import resolve
    except ImportError:  # the training engine is optional for planning on a login node
        return
    probe = copy.deepcopy(cfg)
    probe.setdefault("data", {}).setdefault("dataset", "<generated>")
    config = resolve(probe, where=f"{where}: training configuration")
    if world_size is not None:
        try:
            config.per_replica_batch(world_size)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
