"""The screening chain, stage by stage: read -> refocus -> segment -> detect -> classify.

Each image flows through the stages below. Reading and refocusing run in their own threads, a few
images ahead of the network stages (`StagedPipeline`), so disk, FFTs and networks overlap (TensorFlow
and NumPy release the GIL). Networks see batches of tiles of the refocused phase through one compiled
function per network (`tf.function`, XLA with `xla=True`), always at the same batch size (the last
batch is padded) so nothing is retraced. `ScreenOptions.naive()` is the reference the benchmark
compares against: one tile or crop per eager call, no prefetch, no XLA - the same models and maths.

Refocusing (`physics`): autofocus on a central crop of the on-axis plane, angular-spectrum propagation
of the whole plane, then removal of the slow background phase (offset + tilt) that holograms carry, so
the phase matches what the networks were trained on (the in-focus object phase). (`cnn`): the refocus
network on overlapping field tiles, which predicts the object phase directly.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from cellavie_hpc.data.pipeline import reflect_indices
from cellavie_hpc.data.tiling import plan_tiles
from cellavie_hpc.errors import UserError
from cellavie_hpc.screen.merge import merge_tile_detections
from cellavie_hpc.screen.models_dir import ChainSpec, build_network, load_spec

STAGES = ("read", "refocus", "segment", "detect", "classify")
REFOCUS_MODES = ("physics", "cnn")
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")
PADS = ("none", "edge", "zero")
STAGE_NAMES = ("healthy", "ring", "trophozoite", "schizont")


@dataclasses.dataclass(frozen=True)
class ScreenOptions:
    """How to run the chain (not what it computes, except `refocus`, `pad` and the autofocus search).

    tile / overlap: network tile size and overlap in pixels (overlap >= the largest cell diameter, so
    every cell is whole in some tile); batch: tiles per network call; crop_batch: cells per classifier
    call; prefetch: images read and refocused ahead (0: strictly one after the other); z_range_m /
    coarse_steps / fine_steps / autofocus_crop: the autofocus search; pad: FFT padding of the refocus
    (edge: without it, light wraps around the periodic FFT and cells near the border get 0.1-0.4 rad of
    phase error, which the classifier took for parasites: every false positive of the validation sample
    was within 64 px of the border);
    xla: XLA-compile the network functions (None: only when a GPU is visible - on CPU, XLA's convolutions
    measured ~4x slower than TensorFlow's oneDNN kernels for these networks).
    """
    refocus: str = "physics"
    tile: int = 512
    overlap: int = 64
    batch: int = 4
    crop_batch: int = 256
    prefetch: int = 2
    precision: str = "fp32"
    xla: bool | None = None
    compiled: bool = True
    pad: str = "edge"
    z_range_m: tuple[float, float] = (-60e-6, 60e-6)
    coarse_steps: int = 25
    fine_steps: int = 9
    autofocus_crop: int = 512

    def __post_init__(self) -> None:
        checks = [
            (self.refocus in REFOCUS_MODES, f"--refocus must be one of {REFOCUS_MODES}, got {self.refocus!r}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.pad in PADS, f"--pad must be one of {PADS}, got {self.pad!r}"),
            (self.tile > 0 and self.tile % 32 == 0, f"--tile must be a positive multiple of 32, got {self.tile}"),
            (0 <= self.overlap < self.tile and self.overlap % 2 == 0,
             f"--overlap must be even and in [0, tile), got {self.overlap}"),
            (self.batch >= 1 and self.crop_batch >= 1, "--batch and --crop-batch must be >= 1"),
            (self.prefetch >= 0, f"--prefetch must be >= 0, got {self.prefetch}"),
            (self.z_range_m[0] < self.z_range_m[1], f"z range {self.z_range_m} must be (min, max) with min < max"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def naive(self) -> "ScreenOptions":
        """The unbatched reference: one tile / one crop per eager call, no prefetch, no XLA."""
        return dataclasses.replace(self, batch=1, crop_batch=1, prefetch=0, xla=False, compiled=False)


@dataclasses.dataclass
class ImageResult:
    """The cells of one image (columns of `cells`, one array per column) and the seconds per stage."""
    image_index: int
    image_id: str
    focus_distance_m: float
    cells: dict[str, np.ndarray]
    seconds: dict[str, float]
    wait_s: float = 0.0
    phase: np.ndarray | None = None   # the refocused object phase (H, W) rad, for overlays

    @property
    def n_cells(self) -> int:
        return int(len(self.cells["cy"]))


# ---------------------------------------------------------------- pure image maths

def flatten_background(field: np.ndarray, wrap_low_rad: float = -1.0) -> np.ndarray:
    """Object phase (float32 rad) of an in-focus field (H, W) whose background carries offset + linear tilt.

    Most of a blood smear is background, so the median phase step between neighbours is the tilt and
    the mode of the de-tilted phase is the offset. The result is wrapped into [wrap_low, wrap_low + 2 pi):
    red cells (0 to ~3 rad) never wrap, noise around 0 stays around 0.
    """
    field = np.asarray(field, np.complex64)
    gy = float(np.median(np.angle(field[1:] * np.conj(field[:-1]))))
    gx = float(np.median(np.angle(field[:, 1:] * np.conj(field[:, :-1]))))
    h, w = field.shape
    ramp = (np.exp(-1j * gy * np.arange(h, dtype=np.float64))[:, None].astype(np.complex64)
            * np.exp(-1j * gx * np.arange(w, dtype=np.float64))[None, :].astype(np.complex64))
    flat = np.angle(field * ramp)
    hist, edges = np.histogram(flat, bins=720, range=(-np.pi, np.pi))
    offset = edges[int(np.argmax(hist))] + np.pi / 720
    phase = np.mod(flat - offset - wrap_low_rad, 2 * np.pi) + wrap_low_rad
    return (phase - background_plane(phase)).astype(np.float32)


def background_plane(phase: np.ndarray, background_rad: float = 0.25, step_px: int = 8,
                     rounds: int = 3) -> np.ndarray:
    """Least-squares plane (H, W) float32 through the background pixels of an object phase (H, W) rad.

    The median-step tilt of `flatten_background` leaves a residual ramp of up to +-0.3 rad across a
    2048-pixel image (the cells bias the median); infected cells differ from healthy ones by a lower
    phase of about that size, so the ramp alone made healthy cells look infected on one side of the
    picture. Background = |phase| < `background_rad` on a `step_px` grid, refined `rounds` times on the
    residual of the previous fit.
    """
    h, w = phase.shape
    ys, xs = np.mgrid[0:h:step_px, 0:w:step_px]
    values = phase[::step_px, ::step_px].astype(np.float64).ravel()
    design = np.stack([np.ones(values.size), ys.ravel() / h, xs.ravel() / w], axis=1)
    coef = np.zeros(3)
    for _ in range(rounds):
        keep = np.abs(values - design @ coef) < background_rad
        if keep.sum() < 3:
            break
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
    yy = np.arange(h, dtype=np.float64)[:, None] / h
    xx = np.arange(w, dtype=np.float64)[None, :] / w
    return (coef[0] + coef[1] * yy + coef[2] * xx).astype(np.float32)


def physics_refocus(plane: np.ndarray, ds, options: "ScreenOptions") -> tuple[np.ndarray, float]:
    """(object phase (H, W) float32 rad, focus distance m) of one on-axis hologram plane of data set `ds`:
    autofocus on a central crop, angular-spectrum propagation of the whole plane, background removal.
    The screening chain and the classifier's training crops (`train_chain.refocused_dataset`) both use it,
    so the classifier learns the phase it will see, refocusing artefacts included."""
    from cellavie_hpc.optics.autofocus import autofocus
    from cellavie_hpc.optics.propagation import propagate, spread_margin_px

    o = options
    h, w = plane.shape
    c = min(o.autofocus_crop, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    z = autofocus(plane[y0:y0 + c, x0:x0 + c], z_range_m=o.z_range_m, wavelength_m=ds.wavelength_m,
                  pixel_size_m=ds.pixel_size_m, medium_index=ds.medium_index, coarse_steps=o.coarse_steps,
                  fine_steps=o.fine_steps, border_px=c // 16)
    focused = propagate(plane, z, ds.wavelength_m, ds.pixel_size_m, ds.medium_index, pad=o.pad,
                        pad_px=spread_margin_px(z, ds.pixel_size_m)).numpy()
    return flatten_background(focused), float(z)


def tile_origins(height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """(N, 2) int64 top-left corners of `tile`-sized windows at stride tile - overlap covering the image."""
    plan = plan_tiles([(height, width)], tile, tile - overlap, border="reflect")
    return plan.tiles[:, 1:]


def extract_tiles(image: np.ndarray, origins: np.ndarray, tile: int) -> np.ndarray:
    """(N, tile, tile, ...) windows of `image` (H, W, ...) at `origins`, reflect-padded past the border."""
    h, w = image.shape[:2]
    out = np.empty((len(origins), tile, tile) + image.shape[2:], image.dtype)
    for k, (y, x) in enumerate(np.asarray(origins).tolist()):
        out[k] = image[reflect_indices(y, tile, h)[:, None], reflect_indices(x, tile, w)[None, :]]
    return out


def stitch_tiles(tiles: np.ndarray, origins: np.ndarray, shape: tuple[int, int], overlap: int) -> np.ndarray:
    """Inverse of `extract_tiles` for per-pixel outputs: each pixel from the tile where it is farthest inside
    (tiles in raster order overwrite their predecessors from half the overlap on)."""
    h, w = shape
    tile = tiles.shape[1]
    ys, xs = np.asarray(origins)[:, 0], np.asarray(origins)[:, 1]
    canvas = np.zeros((int(ys.max()) + tile, int(xs.max()) + tile) + tiles.shape[3:], tiles.dtype)
    half = overlap // 2
    for t, (y, x) in zip(tiles, np.asarray(origins).tolist()):
        a, b = (half if y > 0 else 0), (half if x > 0 else 0)
        canvas[y + a:y + tile, x + b:x + tile] = t[a:, b:]
    return canvas[:h, :w]


def crops_around(image: np.ndarray, cy: np.ndarray, cx: np.ndarray, crop: int) -> np.ndarray:
    """(N, crop, crop) windows of `image` (H, W) centred on pixels (cy, cx) (as the classifier was trained)."""
    h, w = image.shape
    ys = np.rint(np.asarray(cy)).astype(np.int64) - crop // 2
    xs = np.rint(np.asarray(cx)).astype(np.int64) - crop // 2
    rows = np.stack([reflect_indices(int(y), crop, h) for y in ys]) if len(ys) else np.empty((0, crop), np.int64)
    cols = np.stack([reflect_indices(int(x), crop, w) for x in xs]) if len(xs) else np.empty((0, crop), np.int64)
    return image[rows[:, :, None], cols[:, None, :]]


def components(mask: np.ndarray, min_area_px: int, max_area_px: int, split_distance_px: int = 0,
               border_min_area_px: int | None = None) -> dict[str, np.ndarray]:
    """Cells as connected regions of a foreground mask: boxes (y0, x0, y1, x1 end-exclusive), centroids, areas.

    Touching cells are split (`split_cells`, `split_distance_px` > 0). A region that touches the image
    border is a cell cut by the field of view and is kept from `border_min_area_px` pixels on (default:
    `min_area_px`), so a cell mostly outside the picture is still classified.
    """
    from scipy import ndimage

    labels, n = split_cells(mask, split_distance_px)
    if n == 0:
        return _empty_cells()
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(labels), labels, index)
    centres = np.asarray(ndimage.center_of_mass(labels > 0, labels, index), np.float64).reshape(-1, 2)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in ndimage.find_objects(labels)],
                     np.float64)
    h, w = mask.shape
    on_border = (boxes[:, 0] == 0) | (boxes[:, 1] == 0) | (boxes[:, 2] == h) | (boxes[:, 3] == w)
    low = np.where(on_border, min_area_px if border_min_area_px is None else border_min_area_px, min_area_px)
    keep = (area >= low) & (area <= max_area_px)
    return {"cy": centres[keep, 0], "cx": centres[keep, 1], "box": boxes[keep], "area_px": area[keep].astype(np.int64),
            "detector_score": np.ones(int(keep.sum()))}


def cells_from_mask(mask: np.ndarray, spec: ChainSpec) -> dict[str, np.ndarray]:
    """`components` with the chain's size limits and splitting: screening and the classifier's training crops."""
    return components(mask, spec.min_area_px, spec.max_area_px, spec.split_distance_px, spec.border_min_area_px)


def split_cells(mask: np.ndarray, split_distance_px: int, large_factor: float = 1.15) -> tuple[np.ndarray, int]:
    """(labels (H, W) int32, count) of the filled regions of `mask`, touching cells split at their neck.

    About 5 % of the cells of a smear touch a neighbour; as one region their centroid falls between
    them and the classifier's crop shows neither (two infected cells of the 40-image sample were lost
    that way). A region larger than `large_factor` x the median region is split when its distance
    transform has several maxima at least `split_distance_px` apart (about 2/3 of a cell radius) and
    0.8 x that deep: each pixel goes to the nearest maximum (the Voronoi cut is the neck between two
    round cells). Only large regions are transformed, so this costs ~10 % of a whole-image transform.
    """
    from scipy import ndimage

    labels, n = ndimage.label(ndimage.binary_fill_holes(mask))
    if split_distance_px <= 0 or n == 0:
        return labels, n
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    objects = ndimage.find_objects(labels)
    count = n
    for label in np.flatnonzero(area > large_factor * np.median(area)) + 1:
        window = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in objects[label - 1])
        own = labels[window] == label
        depth = ndimage.distance_transform_edt(own)
        peaks = (depth == ndimage.maximum_filter(depth, size=2 * split_distance_px + 1)) & (
            depth >= 0.8 * split_distance_px)
        markers, m = ndimage.label(ndimage.binary_dilation(peaks, iterations=2) & own)
        if m < 2:
            continue
        nearest = ndimage.distance_transform_edt(markers == 0, return_distances=False, return_indices=True)
        owner = markers[nearest[0], nearest[1]]
        labels[window][own] = np.where(owner == 1, label, count + owner - 1)[own]
        count += m - 1
    return labels, count


def _empty_cells() -> dict[str, np.ndarray]:
    return {"cy": np.empty(0), "cx": np.empty(0), "box": np.empty((0, 4)), "area_px": np.empty(0, np.int64),
            "detector_score": np.empty(0)}


# ---------------------------------------------------------------- threads between stages

class StagedPipeline:
    """Run `stages` (functions item -> item) each in its own thread, `depth` items buffered between them.

    Iterating yields the last stage's outputs in input order, with the seconds each stage spent on the
    item in `item.seconds[stage]` and the time the consumer waited in `wait_s` of the yielded tuple.
    `depth=0` runs every stage inline in the consumer's thread (no overlap).
    """

    _DONE = object()

    def __init__(self, items: Iterable[Any], stages: list[tuple[str, Callable[[Any], Any]]], depth: int):
        self.items, self.stages, self.depth = items, stages, depth

    def __iter__(self) -> Iterator[tuple[Any, dict[str, float], float]]:
        if self.depth == 0:
            for item in self.items:
                seconds = {}
                for name, fn in self.stages:
                    t0 = time.perf_counter()
                    item = fn(item)
                    seconds[name] = time.perf_counter() - t0
                yield item, seconds, 0.0
            return
        stop = threading.Event()
        queues = [queue.Queue(maxsize=self.depth) for _ in self.stages]
        source: queue.Queue = queue.Queue()
        for item in self.items:
            source.put((item, {}))
        source.put(self._DONE)
        threads = []
        for k, (name, fn) in enumerate(self.stages):
            inbox = source if k == 0 else queues[k - 1]
            t = threading.Thread(target=self._worker, args=(name, fn, inbox, queues[k], stop), daemon=True,
                                 name=f"screen-{name}")
            t.start()
            threads.append(t)
        try:
            while True:
                t0 = time.perf_counter()
                got = queues[-1].get()
                waited = time.perf_counter() - t0
                if got is self._DONE:
                    break
                if isinstance(got, BaseException):
                    raise got
                yield got[0], got[1], waited
        finally:
            stop.set()
            for q in queues:   # unblock producers waiting on a full queue
                while not q.empty():
                    q.get_nowait()
            for t in threads:
                t.join(timeout=5)

    def _worker(self, name, fn, inbox, outbox, stop) -> None:
        while not stop.is_set():
            got = inbox.get()
            if got is self._DONE or isinstance(got, BaseException):
                outbox.put(got)
                return
            item, seconds = got
            try:
                t0 = time.perf_counter()
                result = fn(item)
                seconds[name] = time.perf_counter() - t0
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
                outbox.put(err)
                return
            while not stop.is_set():
                try:
                    outbox.put((result, seconds), timeout=0.2)
                    break
                except queue.Full:
                    continue


# ---------------------------------------------------------------- the chain

class ScreeningChain:
    """A loaded chain (networks rebuilt at the screening tile size) that screens images of a data set."""

    def __init__(self, models_dir, options: ScreenOptions, spec: ChainSpec | None = None):
        import keras

        self.models_dir = models_dir
        self.options = options
        self.spec = spec if spec is not None else load_spec(models_dir)
        if options.refocus == "cnn" and self.spec.refocus is None:
            raise UserError(f"{models_dir}: --refocus cnn needs a refocus network in the chain; use --refocus physics")
        keras.mixed_precision.set_global_policy("float32" if options.precision == "fp32" else options.precision)
        try:
            needed = ["classifier"]
            if self.spec.segmentation == "unet":
                needed.append("unet")
            if self.spec.detection == "detector":
                needed.append("detector")
            if options.refocus == "cnn":
                needed.append("refocus")
            nets = self.spec.networks()
            self.networks = {n: build_network(models_dir, nets[n], None if n == "classifier" else options.tile)
                             for n in needed}
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.crop = self.spec.classifier.patch
        self._calls = {name: self._make_call(name, model) for name, model in self.networks.items()}

    # -- network calls: one compiled function per network, fixed batch sizes

    def _make_call(self, name: str, model) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        import tensorflow as tf

        from cellavie_hpc.models.detector import decode_detections

        spec = self.spec

        def forward(x):
            out = model(x, training=False)
            if name == "detector":
                return decode_detections(out, score_threshold=spec.detector_score, max_detections=256)
            if name == "unet":
                return {"probs": tf.nn.softmax(tf.cast(out["logits"], tf.float32), axis=-1)}
            if name == "classifier":
                return {"probs": tf.nn.softmax(tf.cast(out["logits"], tf.float32), axis=-1)}
            return {"phase": tf.cast(out["phase"], tf.float32)}

        if not self.options.compiled:
            return lambda x: {k: np.asarray(v) for k, v in forward(tf.constant(x)).items()}
        xla = bool(tf.config.list_physical_devices("GPU")) if self.options.xla is None else self.options.xla
        fn = tf.function(forward, jit_compile=xla, reduce_retracing=False)
        return lambda x: {k: v.numpy() for k, v in fn(tf.constant(x)).items()}

    def _batched(self, name: str, inputs: np.ndarray, batch: int) -> dict[str, np.ndarray]:
        """Run network `name` over `inputs` (N, ...) in batches of exactly `batch` (last one padded)."""
        n = len(inputs)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, batch):
            chunk = inputs[start:start + batch]
            real = len(chunk)
            if real < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
            for k, v in self._calls[name](chunk).items():
                parts.setdefault(k, []).append(v[:real])
        return {k: np.concatenate(v) for k, v in parts.items()}

    # -- stages

    def read(self, job: tuple[Any, int]) -> tuple[Any, int, np.ndarray]:
        ds, index = job
        return ds, index, ds.read_field(index)

    def refocus(self, item) -> tuple[Any, int, np.ndarray, float]:
        """(dataset, index, field) -> (dataset, index, object phase (H, W) float32, focus distance m or NaN)."""
        ds, index, field = item
        o = self.options
        if o.refocus == "cnn":
            planes = np.concatenate([field.real.transpose(1, 2, 0)[..., None], field.imag.transpose(1, 2, 0)[..., None]],
                                    axis=-1).reshape(field.shape[1], field.shape[2], -1).astype(np.float32)
            phase = self._per_pixel("refocus", planes)["phase"][..., 0]
            return ds, index, phase.astype(np.float32), float("nan")
        phase, z = physics_refocus(field[0], ds, o)
        return ds, index, phase, z

    def _per_pixel(self, name: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """A fully convolutional network over overlapping tiles of `image` (H, W, C), stitched back to (H, W, ...)."""
        o = self.options
        h, w = image.shape[:2]
        origins = tile_origins(h, w, o.tile, o.overlap)
        out = self._batched(name, extract_tiles(image, origins, o.tile), o.batch)
        return {k: stitch_tiles(v, origins, (h, w), o.overlap) for k, v in out.items()}

    def segment(self, phase: np.ndarray) -> np.ndarray:
        """Foreground (cell) mask (H, W) bool; with the U-Net, its interior class (boundaries split touching cells)."""
        if self.spec.segmentation == "threshold":
            return phase > self.spec.threshold_rad
        probs = self._per_pixel("unet", phase[..., None])["probs"]
        return np.argmax(probs, axis=-1) == 1

    def detect(self, phase: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Cells: components of the mask, or detector boxes merged across tiles and checked against the mask."""
        spec, o = self.spec, self.options
        if spec.detection == "components":
            return cells_from_mask(mask, spec)
        h, w = phase.shape
        origins = tile_origins(h, w, o.tile, o.overlap)
        det = self._batched("detector", extract_tiles(phase[..., None], origins, o.tile), o.batch)
        tile_id, slot = np.nonzero(det["valid"])
        if tile_id.size == 0:
            return _empty_cells()
        shift = np.tile(origins[tile_id], 2).astype(np.float64)
        boxes = det["boxes"][tile_id, slot].astype(np.float64) + shift
        scores = det["scores"][tile_id, slot].astype(np.float64)
        # tiles past the image border are reflect-padded: a detection centred there is a mirror image
        centre_y, centre_x = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = np.flatnonzero((centre_y >= 0) & (centre_y < h) & (centre_x >= 0) & (centre_x < w))
        boxes, scores, tile_id = boxes[inside], scores[inside], tile_id[inside]
        keep = merge_tile_detections(boxes, scores, origins[tile_id], (o.tile, o.tile), (h, w))
        boxes = np.clip(boxes[keep], 0, [h, w, h, w])
        scores = scores[keep]
        cy, cx = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        iy = np.clip(cy.astype(np.int64), 0, h - 1)
        ix = np.clip(cx.astype(np.int64), 0, w - 1)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.int64)
        on_cell = mask[iy, ix] if spec.segmentation == "unet" else phase[iy, ix] > spec.threshold_rad / 2
        return {"cy": cy[on_cell], "cx": cx[on_cell], "box": boxes[on_cell], "area_px": area[on_cell],
                "detector_score": scores[on_cell]}

    def classify(self, phase: np.ndarray, cells: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage probabilities of every cell from a crop centred on it; infected = 1 - P(healthy) >= threshold."""
        n = len(cells["cy"])
        if n == 0:
            probs = np.empty((0, len(STAGE_NAMES)), np.float32)
        else:
            crops = crops_around(phase, cells["cy"], cells["cx"], self.crop)[..., None]
            probs = self._batched("classifier", crops, self.options.crop_batch)["probs"]
        p_infected = 1.0 - probs[:, 0]
        infected = p_infected >= self.spec.infected_threshold
        stage = np.where(infected, 1 + np.argmax(probs[:, 1:], axis=1), 0) if n else np.empty(0, np.int64)
        out = dict(cells)
        out.update({"p_infected": p_infected.astype(np.float64), "infected": infected,
                    "stage": np.asarray(STAGE_NAMES, dtype=object)[stage]})
        for k, s in enumerate(STAGE_NAMES):
            out[f"p_{s}"] = probs[:, k].astype(np.float64)
        return out

    def networks_stage(self, phase: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        seconds = {}
        t0 = time.perf_counter()
        mask = self.segment(phase)
        t1 = time.perf_counter()
        cells = self.detect(phase, mask)
        t2 = time.perf_counter()
        cells = self.classify(phase, cells)
        t3 = time.perf_counter()
        seconds.update(segment=t1 - t0, detect=t2 - t1, classify=t3 - t2)
        return cells, seconds

    def screen(self, dataset, image_indices: Iterable[int]) -> Iterator[ImageResult]:
        """Screen images of `dataset` (in order), yielding one `ImageResult` per image as it completes."""
        jobs = [(dataset, int(i)) for i in image_indices]
        pipeline = StagedPipeline(jobs, [("read", self.read), ("refocus", self.refocus)], self.options.prefetch)
        for (ds, index, phase, focus), seconds, waited in pipeline:
            cells, net_seconds = self.networks_stage(phase)
            info = ds.images[index]
            yield ImageResult(index, info.id, focus, cells, {**seconds, **net_seconds}, waited, phase)

