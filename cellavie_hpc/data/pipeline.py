"""tf.data input pipelines: one rank's shard of tiles -> batches of (inputs, targets) per model task.

Tiles are read in Python (the TIFF reader is NumPy), so the pipeline batches tile coordinates first
and reads `read_batch` windows per `tf.numpy_function` call, several calls in parallel: one Python
call per tile costs more in TF<->Python round trips than the read itself at small patches
(docs/tiling.rst has the measurements). `cache=True` keeps whole images in memory after their first
read (per process, across pipelines), so later epochs slice RAM instead of decoding TIFF tiles; with
`locality=True` sharding each rank caches only its own images.

Windows reaching past an image border (reflect plans, classifier crops near an edge) are
reflect-padded exactly like `np.pad(image, mode="reflect")`.
"""
from __future__ import annotations

import threading
import zlib
from typing import Any, Callable

import numpy as np

from cellavie_hpc.data.tiling import TilePlan, plan_crops, plan_tiles
from cellavie_hpc.errors import ConfigError

TASKS: tuple[str, ...] = ("refocus", "unet", "detector", "classifier")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: Tiles read per Python call (measured fastest on 2 cores, docs/tiling.rst).
DEFAULT_READ_BATCH = 8


def task_plan(dataset, task: str, patch: int, stride: int | None = None, border: str = "drop") -> TilePlan:
    """The plan a task trains on: a tile grid, or for the classifier one `patch`-sized crop per listed cell
    whose centre lies inside the image."""
    _check_task(task)
    sizes = [(im.height, im.width) for im in dataset.images]
    if task != "classifier":
        return plan_tiles(sizes, patch, stride, border)
    return plan_crops(sizes, _cell_centres(dataset), patch)


def cell_labels(dataset, tiles: np.ndarray, crop: int) -> np.ndarray:
    """Classifier label (0 healthy, 1 ring, 2 trophozoite, 3 schizont) of the cell each crop is centred on,
    -1 for a tile that is not a `crop`-sized window centred on a listed cell (first listed cell wins a tie)."""
    from cellavie_hpc.models.targets import stage_label

    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 3)
    half = crop // 2
    lookup: dict[tuple[int, int, int], int] = {}
    for image in np.unique(tiles[:, 0]).tolist():
        for cell in dataset.cells(image):
            cy, cx = _centre(cell)
            lookup.setdefault((image, cy - half, cx - half), stage_label(cell["stage"]))
    return np.array([lookup.get(key, -1) for key in map(tuple, tiles.tolist())], dtype=np.int32)


def build_pipeline(
    dataset,
    shard_tiles: np.ndarray,
    task: str,
    batch: int,
    patch: int,
    *,
    spec=None,
    cache: bool = False,
    shuffle_buffer: int = 0,
    prefetch: int = -1,
    parallel_reads: int = -1,
    augment: bool = False,
    defocus_jitter_m: float = 0.0,
    seed: int = 0,
    epoch: int = 0,
    dtype: str = "float32",
    drop_remainder: bool = True,
    balanced: bool = False,
    read_batch: int = DEFAULT_READ_BATCH,
):
    """One epoch of `(inputs, targets)` batches over `shard_tiles` ((n, 3) int `(image, y, x)`, read in order).

    `targets` is always the dict `spec.targets.from_truth` makes (keys and per-sample shapes of
    `spec.targets.shapes`), computed in tf.data from the tile's truth rasters `phase`, `instance`, `cls`
    and its image's `focus_distance_m`, so every model gets exactly what its `ModelSpec.loss` takes.
    `spec` is the `models.registry.ModelSpec` being trained (its options decide e.g. the refocus defocus
    head or the detector's classes); None means the default options of `task` at this patch.
    Inputs (P = `patch`, A = illumination angles): `refocus` (P, P, 2A) defocused field (real, imag per
    angle); `unet`, `detector` (P, P, 1) in-focus phase; `classifier` (P, P, 1) phase crop centred on a
    cell (tiles from `task_plan`), `balanced=True` resampling crops (same count, so steps stay equal
    across ranks) to half healthy, half infected. `shuffle_buffer=0` keeps the shard order (already a per-epoch
    permutation); `prefetch`/`parallel_reads` of -1 mean AUTOTUNE. Augmentation (flips, 90-degree
    rotations, applied to inputs and truth rasters before the targets are made) is deterministic in
    (seed, epoch, position). `defocus_jitter_m` > 0 (refocus only) propagates each input field by a
    random known distance in [-jitter, +jitter] and moves its focus-distance target by the same amount,
    so the network sees defocus distances the data set does not hold; deterministic like augmentation.
    Inputs are cast to `dtype`; targets keep the spec's dtypes.
    """
    import tensorflow as tf

    _check_task(task)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("batch", batch), ("patch", patch), ("read_batch", read_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    spec = _checked_spec(spec, dataset, task, int(patch))
    if not np.isfinite(defocus_jitter_m) or defocus_jitter_m < 0 or (defocus_jitter_m > 0 and task != "refocus"):
        raise ConfigError(f"defocus_jitter_m must be a finite distance >= 0, and > 0 only for the refocus task "
                          f"(got {defocus_jitter_m!r} for task {task})")
    tiles = np.asarray(shard_tiles, dtype=np.int64).reshape(-1, 3)
    if tiles.size and (tiles[:, 0].min() < 0 or tiles[:, 0].max() >= len(dataset.images)):
        raise ConfigError(f"shard names images outside 0..{len(dataset.images) - 1} of {dataset.root}")
    if task == "classifier":
        labels = cell_labels(dataset, tiles, patch)
        if (labels < 0).any():
            n = int(np.argmax(labels < 0))
            raise ConfigError(f"tile {tiles[n].tolist()} is not a crop centred on a listed cell of {dataset.root}; "
                              "build classifier tiles with task_plan(dataset, 'classifier', patch)")
        if balanced and len(tiles):
            tiles = tiles[_balanced_indices(labels, seed, epoch, tiles)]

    reader = _TileReader(dataset, task, patch, cache)
    autotune = tf.data.AUTOTUNE
    parallel = autotune if parallel_reads < 0 else max(1, parallel_reads)
    specs = reader.specs()

    def read(batch_tiles):
        out = tf.numpy_function(reader.read, [batch_tiles], [s[1] for s in specs], stateful=False)
        for tensor, (shape, _) in zip(out, specs):
            tensor.set_shape((None, *shape))
        # The image index travels with each sample (its focus distance), with the defocus added since (m).
        return (*out, batch_tiles[:, 0], tf.zeros(tf.shape(batch_tiles)[:1], tf.float32))

    data = tf.data.Dataset.from_tensor_slices(tiles)
    data = data.batch(read_batch).map(read, num_parallel_calls=parallel).unbatch()
    if defocus_jitter_m > 0:
        data = data.enumerate().map(_defocus_jitterer(dataset, defocus_jitter_m, seed, epoch),
                                    num_parallel_calls=parallel)
    if shuffle_buffer > 0:
        data = data.shuffle(shuffle_buffer, seed=_mix(seed, epoch), reshuffle_each_iteration=False)
    if augment:
        data = data.enumerate().map(_augmenter(seed, epoch), num_parallel_calls=parallel)
    data = data.map(_sample_maker(task, spec, dataset, dtype), num_parallel_calls=parallel)
    data = data.batch(batch, drop_remainder=drop_remainder)
    if prefetch != 0:
        data = data.prefetch(autotune if prefetch < 0 else prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return data.with_options(options)


def _checked_spec(spec, dataset, task: str, patch: int):
    """The ModelSpec whose targets the pipeline makes: the given one if it fits the task, patch and data set."""
    from cellavie_hpc.models.registry import model_spec

    channels = 2 * int(dataset.angles) if task == "refocus" else 1
    if spec is None:
        return model_spec(task, "tiny", patch, channels)
    if (spec.name, spec.patch, spec.in_channels) != (task, patch, channels):
        raise ConfigError(f"model spec {spec.name} (patch {spec.patch}, {spec.in_channels} input channels) does not "
                          f"fit task {task} with patch {patch} and {channels} channels from {dataset.root}; "
                          "build the spec with the data set's patch and channels")
    return spec


class _TileReader:
    """Reads batches of windows through the data-set API (or from whole images kept in memory)."""

    _image_cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    _cache_lock = threading.Lock()

    def __init__(self, dataset, task: str, patch: int, cache: bool):
        self.dataset, self.task, self.patch, self.cache = dataset, task, patch, cache
        self.angles = int(dataset.angles)

    def specs(self) -> list[tuple[tuple[int, ...], Any]]:
        """Per-sample shape and dtype of each array `read` returns."""
        import tensorflow as tf

        p = self.patch
        if self.task == "refocus":
            return [((p, p, 2 * self.angles), tf.float32), ((p, p), tf.float32)]
        return [((p, p), tf.float32), ((p, p), tf.int32), ((p, p), tf.int32)]

    def read(self, tiles: np.ndarray) -> list[np.ndarray]:
        p = self.patch
        n = len(tiles)
        field = np.empty((n, p, p, 2 * self.angles), np.float32) if self.task == "refocus" else None
        truth_keys = ("phase",) if self.task == "refocus" else ("phase", "instance", "cls")
        truth = {k: np.empty((n, p, p), np.float32 if k == "phase" else np.int32) for k in truth_keys}
        for k, (image, y, x) in enumerate(tiles.tolist()):
            if field is not None:
                window = self._window(image, y, x, "field")  # (A, p, p) complex64
                field[k, ..., 0::2] = window.real.transpose(1, 2, 0)
                field[k, ..., 1::2] = window.imag.transpose(1, 2, 0)
            rasters = self._window(image, y, x, "truth")
            for key in truth_keys:
                truth[key][k] = rasters[key]
        return ([field] if field is not None else []) + [truth[k] for k in truth_keys]

    def _window(self, image: int, y: int, x: int, kind: str):
        info = self.dataset.images[image]
        rows = reflect_indices(y, self.patch, info.height)
        cols = reflect_indices(x, self.patch, info.width)
        y0, y1 = int(rows.min()), int(rows.max()) + 1
        x0, x1 = int(cols.min()), int(cols.max()) + 1
        inside = y0 == y and x0 == x and y1 - y0 == self.patch and x1 - x0 == self.patch
        if self.cache:
            whole = self._cached(image, kind)
            pick = (lambda a: a[..., y:y + self.patch, x:x + self.patch]) if inside else (
                lambda a: a[..., rows[:, None], cols[None, :]])
        else:
            if kind == "field":
                whole = self.dataset.read_field_patch(image, y0, x0, y1 - y0, x1 - x0)
            else:
                whole = self.dataset.read_truth_patch(image, y0, x0, y1 - y0, x1 - x0)
            pick = (lambda a: a) if inside else (lambda a: a[..., rows[:, None] - y0, cols[None, :] - x0])
        if kind == "field":
            return pick(whole)
        return {k: pick(v) for k, v in whole.items()}

    def _cached(self, image: int, kind: str):
        key = (f"{self.dataset.root}:{kind}", image)
        entry = self._image_cache.get(key)
        if entry is None:
            info = self.dataset.images[image]
            if kind == "field":
                entry = self.dataset.read_field(image)
            else:
                entry = self.dataset.read_truth_patch(image, 0, 0, info.height, info.width)
            with self._cache_lock:
                self._image_cache[key] = entry
        return entry


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
    """Source indices of positions start..start+length-1 along an axis of `size`, reflected at the
    borders as `np.pad(mode="reflect")` does (edge pixel not repeated; any number of reflections)."""
    pos = np.arange(start, start + length, dtype=np.int64)
    if size == 1:
        return np.zeros_like(pos)
    period = 2 * (size - 1)
    pos = np.mod(pos, period)
    return np.where(pos >= size, period - pos, pos)


def clear_image_cache() -> None:
    """Forget every image kept by `cache=True` pipelines in this process."""
    with _TileReader._cache_lock:
        _TileReader._image_cache.clear()


def _sample_maker(task: str, spec, dataset, dtype: str) -> Callable:
    """(rasters..., image) -> (input cast to `dtype`, `spec.targets.from_truth` of the truth rasters)."""
    import tensorflow as tf

    cast = tf.dtypes.as_dtype(dtype)
    focus_m = tf.constant([info.focus_distance_m for info in dataset.images], tf.float32)

    def make(*arrays):
        *rasters, image, added_defocus_m = arrays
        if task == "refocus":
            field, phase = rasters
            inputs, truth = field, {"phase": phase}
        else:
            phase, instance, cls = rasters
            inputs, truth = phase[..., tf.newaxis], {"phase": phase, "instance": instance, "cls": cls}
        truth["focus_distance_m"] = tf.gather(focus_m, image) - added_defocus_m
        return tf.cast(inputs, cast), spec.targets.from_truth(truth)

    return make


def _augmenter(seed: int, epoch: int) -> Callable:
    """Random flip + k*90-degree rotation per sample, the same on every spatial array of the sample."""
    import tensorflow as tf

    base = _mix(seed, epoch)

    def apply(index, arrays):
        draw = tf.random.stateless_uniform([2], seed=tf.stack([tf.constant(base, tf.int64), index]),
                                           minval=0, maxval=8, dtype=tf.int32)
        k, flip = draw[0] % 4, draw[1] % 2

        def move(a):
            if a.shape.rank is not None and a.shape.rank < 2:
                return a  # the image index and added defocus: nothing spatial to move
            squeeze = a.shape.rank == 2
            a = a[..., tf.newaxis] if squeeze else a
            a = tf.image.rot90(a, k)
            a = tf.cond(flip == 1, lambda: tf.image.flip_left_right(a), lambda: a)
            return a[..., 0] if squeeze else a

        return tuple(move(a) for a in arrays)

    return apply


def _defocus_jitterer(dataset, jitter_m: float, seed: int, epoch: int) -> Callable:
    """Propagate each sample's field (P, P, 2A) by a uniform random distance in [-jitter_m, jitter_m]
    (edge padding against wrap-around) and add it to the sample's defocus."""
    import tensorflow as tf

    from cellavie_hpc.optics.propagation import propagate

    base = _mix(seed, epoch + 1_000_003)  # independent of the flips/rotations drawn from (seed, epoch)

    def apply(index, sample):
        field, phase, image, added_m = sample
        shift_m = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(base, tf.int64), index]),
                                              minval=-jitter_m, maxval=jitter_m)
        planes = tf.transpose(tf.complex(field[..., 0::2], field[..., 1::2]), [2, 0, 1])  # (A, P, P)
        moved = tf.transpose(propagate(planes, shift_m, dataset.wavelength_m, dataset.pixel_size_m,
                                       dataset.medium_index, pad="edge"), [1, 2, 0])
        channels = tf.reshape(tf.stack([tf.math.real(moved), tf.math.imag(moved)], axis=-1), tf.shape(field))
        return channels, phase, image, added_m + shift_m

    return apply


def _balanced_indices(labels: np.ndarray, seed: int, epoch: int, tiles: np.ndarray) -> np.ndarray:
    """As many crops as given, drawn with replacement so healthy and infected crops are equally likely (stages
    keep their natural shares among the infected).

    Equal shares per stage drew the rarest stage (4 schizonts of ~900 crops) ~60 times per epoch each and overfit:
    held-out specificity 0.84-0.88 at 300 steps on the d12 set vs 0.92-1.0 with the infected half (docs/models.rst).
    """
    infected = labels > 0
    groups = np.array([np.count_nonzero(~infected), np.count_nonzero(infected)], np.float64)
    weights = 1.0 / groups[infected.astype(np.int64)]
    sequence = np.random.SeedSequence([seed, epoch, zlib.crc32(tiles.tobytes())])
    rng = np.random.Generator(np.random.PCG64(sequence))
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def _mix(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint32)[0])


def _centre(cell: dict) -> tuple[int, int]:
    """Pixel holding a cell's centre (the listed centre rounded to the nearest pixel)."""
    return int(np.rint(cell["cy"])), int(np.rint(cell["cx"]))


def _cell_centres(dataset) -> np.ndarray:
    """Centres of the listed cells whose centre pixel lies inside their image (clipped cells may not)."""
    rows = [
        (i, *_centre(c)) for i, info in enumerate(dataset.images) for c in dataset.cells(i)
        if 0 <= _centre(c)[0] < info.height and 0 <= _centre(c)[1] < info.width
    ]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
