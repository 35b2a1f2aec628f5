"""Synthetic holograms of blood with exact ground truth: the embedded default data set.

Each image is a thin phase object: red blood cells with the biconcave Evans-Fung thickness profile
(refractive index ~1.40 in a 1.335 medium), some infected at ring, trophozoite or schizont stage
(cytoplasm index falling with stage after Park et al., PNAS 2008; a low-index parasite body; high-index,
absorbing hemozoin spots). Phase = 2 pi / lambda * (n_cell - n_medium) * thickness. The in-focus field is
defocused by a random known distance with the band-limited angular spectrum (`propagate_np`, the same
kernel as the TensorFlow `propagate`), then gets a slow background phase (offset + tilt) and shot noise.

Cells are rendered on a canvas larger than the image by the lateral spread of the defocus, so the periodic
FFT never wraps light into the image; the image is the centre crop. Convention: `focus_distance_m` is the
distance to propagate the hologram by to bring it into focus (hologram = propagate(in_focus, -focus)).

Everything for image i comes from `SeedSequence([seed, i])`, so any number of worker processes gives
bit-identical output. Workers use NumPy only (TensorFlow is never imported here).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path

import numpy as np

from cellavie_hpc import __version__
from cellavie_hpc.data.dataset import FORMAT_NAME, FORMAT_VERSION, sha256_file
from cellavie_hpc.data.tiff_io import COMPLEX_ENCODING, TILE, field_to_samples, write_tiled
from cellavie_hpc.errors import UserError
from cellavie_hpc.optics.propagation import fast_fft_size, propagate_np
from cellavie_hpc.progress import Progress

STAGES = ("healthy", "ring", "trophozoite", "schizont")   # class id = position + 1 (0 = background)
_INFECTED_STAGES = STAGES[1:]

# Evans & Fung (1972) thickness T(rho) = sqrt(1 - rho^2) (C0 + C1 rho^2 + C2 rho^4), in micrometres.
_EF_C0, _EF_C1, _EF_C2 = 0.81, 7.83, -4.39
# Cytoplasm refractive index by stage (Park et al. 2008): healthy, ring, trophozoite, schizont.
_CYTOPLASM_INDEX = (1.399, 1.395, 1.383, 1.373)
_PARASITE_INDEX = 1.36
_HEMOZOIN_INDEX = 1.80
_ABSORPTION_PER_UM = 0.01          # weak hemoglobin absorption (amplitude attenuation per micrometre)
_HEMOZOIN_ABSORPTION_PER_UM = 1.2  # hemozoin is dark


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that defines a synthetic data set (stored in the manifest under `parameters`)."""

    height: int = 2048
    width: int = 2048
    wavelength_m: float = 532e-9
    pixel_size_m: float = 0.25e-6
    medium_index: float = 1.335
    parasitemia: float = 0.01
    stage_mix: tuple[float, float, float] = (0.6, 0.3, 0.1)   # ring, trophozoite, schizont
    angles: int = 1
    illumination_tilt_deg: float = 10.0     # polar angle of planes 1..A-1 (plane 0 is on-axis)
    defocus_m: tuple[float, float] = (10e-6, 40e-6)   # |focus distance| range; the sign is random
    coverage: float = 0.25                  # fraction of the area covered by cells
    max_overlap: float = 0.05               # centres may approach to (1 - max_overlap) of the summed radii
    cell_diameter_m: float = 7.8e-6
    photons_per_pixel: float = 1.0e4        # shot noise: complex Gaussian, sigma = 1 / (2 sqrt(N)) per quadrature
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.height < 32 or self.width < 32:
            problems.append(f"size {self.height}x{self.width} is below 32 pixels")
        if not 0.0 <= self.parasitemia <= 1.0:
            problems.append(f"parasitemia {self.parasitemia} is not a fraction in [0, 1]")
        if self.angles < 1:
            problems.append(f"angles {self.angles} must be >= 1")
        if not 0 < self.coverage <= 0.5:
            problems.append(f"coverage {self.coverage} must be in (0, 0.5]")
        if not 0 <= self.defocus_m[0] <= self.defocus_m[1]:
            problems.append(f"defocus range {self.defocus_m} must be 0 <= min <= max")
        if self.wavelength_m <= 0 or self.pixel_size_m <= 0:
            problems.append("wavelength_m and pixel_size_m must be positive")
        if len(self.stage_mix) != 3 or min(self.stage_mix) < 0 or sum(self.stage_mix) <= 0:
            problems.append(f"stage_mix {self.stage_mix} must be 3 non-negative weights")
        if problems:
            raise UserError("synthetic data set parameters: " + "; ".join(problems))

    @property
    def margin_px(self) -> int:
        """Canvas margin: the lateral spread (up to 45 degrees) of the largest defocus, plus a cell."""
        cell_px = self.cell_diameter_m / self.pixel_size_m
        return int(math.ceil(self.defocus_m[1] / self.pixel_size_m + 1.5 * cell_px))

    @property
    def canvas_shape(self) -> tuple[int, int]:
        return (fast_fft_size(self.height + 2 * self.margin_px), fast_fft_size(self.width + 2 * self.margin_px))


@dataclass
class SyntheticImage:
    """One rendered image with its ground truth (image coordinates, pixels)."""

    field: np.ndarray          # complex64 (A, H, W) hologram, one plane per illumination angle
    phase: np.ndarray          # float32 (H, W) in-focus object phase, radians (no background, no noise)
    instance: np.ndarray       # uint32 (H, W) cell ids, 0 = background
    cls: np.ndarray            # uint8 (H, W) 0 background, 1 healthy, 2 ring, 3 trophozoite, 4 schizont
    cells: list[dict]
    focus_distance_m: float
    illumination: list[dict] = dc_field(default_factory=list)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index`: independent of how images are spread over processes."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def exact_count(rng: np.random.Generator, expected: float) -> int:
    """floor(expected) plus one with probability frac(expected): the mean is exact even for 1e-5 x 1000 cells."""
    base = math.floor(expected)
    return int(base) + int(rng.random() < expected - base)


def _place_cells(rng: np.random.Generator, params: SyntheticParams, shape: tuple[int, int], patch: int):
    """Random sequential addition of ellipses with at most `max_overlap` approach; returns arrays."""
    r0 = params.cell_diameter_m / 2 / params.pixel_size_m
    target = int(params.coverage * shape[0] * shape[1] / (math.pi * r0 * r0))
    n_try = 3 * target + 100
    radius = np.clip(rng.normal(r0, 0.06 * r0, n_try), 0.75 * r0, 1.25 * r0)
    ellipticity = rng.uniform(0.0, 0.12, n_try)
    lo = patch // 2 + 1
    cy = rng.uniform(lo, shape[0] - lo - 1, n_try)
    cx = rng.uniform(lo, shape[1] - lo - 1, n_try)
    reach = radius * (1 + ellipticity)            # largest semi-axis
    cell = 2.0 * (1.25 * r0 * 1.12)               # grid pitch >= largest possible pair distance / 2
    grid: dict[tuple[int, int], list[int]] = {}
    kept: list[int] = []
    for i in range(n_try):
        gy, gx = int(cy[i] // cell), int(cx[i] // cell)
        ok = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for j in grid.get((gy + dy, gx + dx), ()):
                    if math.hypot(cy[i] - cy[j], cx[i] - cx[j]) < (reach[i] + reach[j]) * (1 - params.max_overlap):
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gy, gx), []).append(i)
            kept.append(i)
            if len(kept) >= target:
                break
    k = np.array(kept, dtype=np.int64)
    n = len(k)
    return dict(cy=cy[k], cx=cx[k], a=radius[k] * (1 + ellipticity[k]), b=radius[k] * (1 - ellipticity[k]),
                theta=rng.uniform(0, np.pi, n), thickness_scale=np.clip(rng.normal(1.0, 0.07, n), 0.8, 1.2),
                centre_scale=rng.uniform(0.9, 1.3, n))


def _parasite(rng: np.random.Generator, stage: str, u: np.ndarray, v: np.ndarray, r_px: float, px_um: float):
    """Parasite body thickness and hemozoin thickness (micrometres) on a cell's local grid (pixels)."""
    body = np.zeros_like(u)
    hemozoin = np.zeros_like(u)

    def blob(cy, cx, sigma_px, height_um):
        return height_um * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma_px ** 2))

    off = rng.uniform(0, 0.35 * r_px) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    oy, ox = off.imag, off.real
    if stage == "ring":
        ring_r = rng.uniform(0.22, 0.32) * r_px
        d = np.hypot(u - ox, v - oy)
        body += 0.7 * np.exp(-((d - ring_r) ** 2) / (2 * (0.25 / px_um) ** 2))
        body += blob(oy + ring_r * 0.7, ox + ring_r * 0.7, 0.3 / px_um, 0.6)   # chromatin dot
        spots = 0
    elif stage == "trophozoite":
        body += blob(oy, ox, rng.uniform(0.25, 0.35) * r_px, 1.1)
        spots = int(rng.integers(1, 4))
    else:  # schizont: a cluster of merozoites
        for _ in range(int(rng.integers(8, 17))):
            m = rng.uniform(0, 0.55 * r_px) * np.exp(1j * rng.uniform(0, 2 * np.pi))
            body += blob(m.imag, m.real, 0.35 / px_um, 0.8)
        spots = int(rng.integers(3, 7))
    for _ in range(spots):
        h = rng.uniform(0, 0.3 * r_px) * np.exp(1j * rng.uniform(0, 2 * np.pi))
        hemozoin += blob(oy + h.imag, ox + h.real, 0.18 / px_um, 0.3)
    return body, hemozoin


def render_image(params: SyntheticParams, index: int) -> SyntheticImage:
    """Render image `index` of the data set defined by `params` (pure: same inputs, same arrays)."""
    rng = image_rng(params.seed, index)
    px_um = params.pixel_size_m * 1e6
    k0_per_um = 2 * np.pi / (params.wavelength_m * 1e6)
    canvas = params.canvas_shape
    my = (canvas[0] - params.height) // 2
    mx = (canvas[1] - params.width) // 2
    r0 = params.cell_diameter_m / 2 / params.pixel_size_m
    patch = 2 * int(math.ceil(1.25 * r0 * 1.12)) + 3
    cells = _place_cells(rng, params, canvas, patch)
    n = len(cells["cy"])

    # Per-cell local grids (n, patch, patch), pixel centres at integer canvas coordinates.
    iy0 = np.floor(cells["cy"]).astype(np.int64) - patch // 2
    ix0 = np.floor(cells["cx"]).astype(np.int64) - patch // 2
    offs = np.arange(patch)
    dy = (iy0[:, None] + offs[None, :] - cells["cy"][:, None])[:, :, None]
    dx = (ix0[:, None] + offs[None, :] - cells["cx"][:, None])[:, None, :]
    cos_t, sin_t = np.cos(cells["theta"])[:, None, None], np.sin(cells["theta"])[:, None, None]
    u = dx * cos_t + dy * sin_t
    v = -dx * sin_t + dy * cos_t
    rho2 = (u / cells["a"][:, None, None]) ** 2 + (v / cells["b"][:, None, None]) ** 2
    inside = rho2 < 1.0
    rho2c = np.minimum(rho2, 1.0)
    thickness_um = (cells["thickness_scale"][:, None, None] * np.sqrt(1.0 - rho2c)
                    * (_EF_C0 * cells["centre_scale"][:, None, None] + _EF_C1 * rho2c + _EF_C2 * rho2c ** 2))

    # Which cells the image shows, and which of those are infected (exact count, right expectation).
    rows_any = inside.any(axis=2)
    cols_any = inside.any(axis=1)
    y_first = iy0 + rows_any.argmax(axis=1)
    y_last = iy0 + patch - 1 - rows_any[:, ::-1].argmax(axis=1)
    x_first = ix0 + cols_any.argmax(axis=1)
    x_last = ix0 + patch - 1 - cols_any[:, ::-1].argmax(axis=1)
    near = np.flatnonzero((y_last >= my) & (y_first < my + params.height)
                          & (x_last >= mx) & (x_first < mx + params.width))
    bbox = {}   # cell -> (y0, x0, y1, x1) of its part inside the image
    for i in near:
        y0, y1, x0, x1 = int(y_first[i]) - my, int(y_last[i]) + 1 - my, int(x_first[i]) - mx, int(x_last[i]) + 1 - mx
        if min(y0, x0) < 0 or y1 > params.height or x1 > params.width:     # clipped: measure what is visible
            ys, xs = iy0[i] - my + offs, ix0[i] - mx + offs
            visible = inside[i] & ((ys >= 0) & (ys < params.height))[:, None] & ((xs >= 0) & (xs < params.width))
            rr, cc = np.nonzero(visible)
            if rr.size == 0:
                continue          # its bounding box grazes the image, the ellipse does not
            y0, y1, x0, x1 = int(ys[rr.min()]), int(ys[rr.max()]) + 1, int(xs[cc.min()]), int(xs[cc.max()]) + 1
        bbox[i] = (y0, x0, y1, x1)
    shown = np.fromiter(bbox, np.int64, len(bbox))
    n_infected = exact_count(rng, params.parasitemia * len(shown))
    stage_idx = np.zeros(n, np.int64)
    infected = rng.choice(shown, size=n_infected, replace=False) if n_infected else np.empty(0, np.int64)
    mix = np.asarray(params.stage_mix, float)
    stage_idx[infected] = 1 + rng.choice(3, size=n_infected, p=mix / mix.sum())

    n_cyto = np.asarray(_CYTOPLASM_INDEX)[stage_idx] + rng.normal(0, 0.002, n)
    phase = k0_per_um * (n_cyto - params.medium_index)[:, None, None] * thickness_um
    absorb = _ABSORPTION_PER_UM * thickness_um
    for i in infected:
        stage = STAGES[stage_idx[i]]
        flatten = {"ring": 0.0, "trophozoite": 0.3, "schizont": 0.6}[stage]   # late stages lose concavity
        dome = 2.0 * np.sqrt(1.0 - rho2c[i])
        t_cell = (1 - flatten) * thickness_um[i] + flatten * dome
        body, hz = _parasite(rng, stage, u[i], v[i], math.sqrt(cells["a"][i] * cells["b"][i]), px_um)
        body = np.minimum(body, 0.8 * t_cell) * inside[i]
        hz = np.minimum(hz, 0.5 * t_cell) * inside[i]
        phase[i] = k0_per_um * ((n_cyto[i] - params.medium_index) * t_cell
                                + (_PARASITE_INDEX - n_cyto[i]) * body + (_HEMOZOIN_INDEX - n_cyto[i]) * hz)
        absorb[i] = _ABSORPTION_PER_UM * t_cell + _HEMOZOIN_ABSORPTION_PER_UM * hz
    phase *= inside
    absorb *= inside

    # Scatter onto the canvas: overlapping cells add their optical path (light crosses both).
    flat = ((iy0[:, None, None] + offs[None, :, None]) * canvas[1] + (ix0[:, None, None] + offs[None, None, :]))
    sel = inside.ravel()
    pix = np.broadcast_to(flat, inside.shape).ravel()[sel]
    owner = np.broadcast_to(np.arange(n)[:, None, None], inside.shape).ravel()[sel]
    size = canvas[0] * canvas[1]
    phase_canvas = np.bincount(pix, weights=phase.ravel()[sel], minlength=size).reshape(canvas)
    absorb_canvas = np.bincount(pix, weights=absorb.ravel()[sel], minlength=size).reshape(canvas)

    # Instance raster: where cells overlap, the pixel goes to the cell it is deepest inside (smallest rho).
    owner_canvas = np.zeros(size, np.int64)
    owner_canvas[pix] = owner + 1
    count = np.bincount(pix, minlength=size)
    shared = count[pix] > 1
    if shared.any():
        sp, so, sr = pix[shared], owner[shared], rho2.ravel()[sel][shared]
        order = np.lexsort((sr, sp))
        sp, so = sp[order], so[order]
        first = np.r_[True, sp[1:] != sp[:-1]]
        owner_canvas[sp[first]] = so[first] + 1
    owner_canvas = owner_canvas.reshape(canvas)

    # Truth in image coordinates; shown cells get ids 1..m in placement order.
    crop = (slice(my, my + params.height), slice(mx, mx + params.width))
    new_id = np.zeros(n + 1, np.uint32)
    new_id[shown + 1] = np.arange(1, len(shown) + 1, dtype=np.uint32)
    instance = new_id[owner_canvas[crop]]
    cls = np.zeros(n + 1, np.uint8)
    cls[1:] = (stage_idx + 1).astype(np.uint8)
    cls_raster = np.where(instance > 0, cls[owner_canvas[crop]], 0).astype(np.uint8)
    truth_cells = []
    for new, i in enumerate(shown, start=1):
        y0, x0, y1, x1 = bbox[i]
        clipped = bool(y_first[i] < my or x_first[i] < mx or y_last[i] >= my + params.height
                       or x_last[i] >= mx + params.width)
        truth_cells.append({
            "id": new, "cy": round(float(cells["cy"][i] - my), 3), "cx": round(float(cells["cx"][i] - mx), 3),
            "radius_px": round(float(math.sqrt(cells["a"][i] * cells["b"][i])), 3),
            "semi_axes_px": [round(float(cells["a"][i]), 3), round(float(cells["b"][i]), 3)],
            "orientation_rad": round(float(cells["theta"][i]), 4),
            "bbox": [y0, x0, y1, x1], "clipped": clipped,
            "infected": bool(stage_idx[i] > 0), "stage": STAGES[stage_idx[i]],
            "cytoplasm_index": round(float(n_cyto[i]), 5),
        })

    # Defocus each illumination plane, then background phase and shot noise.
    sign = 1.0 if rng.random() < 0.5 else -1.0
    focus_m = sign * rng.uniform(*params.defocus_m)
    transmittance = np.exp(-absorb_canvas + 1j * phase_canvas).astype(np.complex64)
    yy = np.arange(canvas[0])[:, None]
    xx = np.arange(canvas[1])[None, :]
    sigma = 1.0 / (2.0 * math.sqrt(params.photons_per_pixel))
    planes, illumination = [], []
    for a in range(params.angles):
        # Tilted plane wave rounded onto the canvas frequency grid, so it is exactly periodic.
        polar = 0.0 if a == 0 else math.radians(params.illumination_tilt_deg)
        azimuth = 0.0 if a == 0 else 2 * math.pi * (a - 1) / (params.angles - 1)
        f_medium = params.medium_index / params.wavelength_m * math.sin(polar)
        ky = round(f_medium * math.sin(azimuth) * canvas[0] * params.pixel_size_m)
        kx = round(f_medium * math.cos(azimuth) * canvas[1] * params.pixel_size_m)
        carrier = (np.exp(2j * np.pi * (ky * yy / canvas[0] + kx * xx / canvas[1])).astype(np.complex64)
                   if (ky, kx) != (0, 0) else np.ones((1, 1), np.complex64))
        hologram = propagate_np(transmittance * carrier, -focus_m, params.wavelength_m, params.pixel_size_m,
                                params.medium_index)
        fy, fx = ky / (canvas[0] * params.pixel_size_m), kx / (canvas[1] * params.pixel_size_m)
        kz = 2 * np.pi * math.sqrt((params.medium_index / params.wavelength_m) ** 2 - fy ** 2 - fx ** 2)
        # Demodulate: remove the propagated carrier, keeping the object's lateral shift with the tilt.
        plane = hologram[crop] * np.conj(carrier[crop] if carrier.size > 1 else carrier)
        plane *= np.complex64(np.exp(1j * kz * focus_m))
        g = rng.normal(0.0, 2 * np.pi / max(params.height, params.width), 2)   # slow tilt, rad / pixel
        offset = rng.uniform(-np.pi, np.pi)
        background = offset + g[0] * yy[:params.height] + g[1] * xx[:, :params.width]
        plane = plane * np.exp(1j * background).astype(np.complex64)
        noise = rng.standard_normal((2,) + plane.shape, dtype=np.float32) * np.float32(sigma)
        planes.append((plane + noise[0] + 1j * noise[1]).astype(np.complex64))
        illumination.append({"polar_deg": round(math.degrees(polar), 4), "azimuth_deg": round(math.degrees(azimuth), 4),
                             "frequency_per_m": [fy, fx], "background_offset_rad": float(offset),
                             "background_tilt_rad_per_px": [float(g[0]), float(g[1])]})
    return SyntheticImage(field=np.stack(planes), phase=phase_canvas[crop].astype(np.float32), instance=instance,
                          cls=cls_raster, cells=truth_cells, focus_distance_m=float(focus_m),
                          illumination=illumination)


def image_id(index: int) -> str:
    return f"img-{index:05d}"


def _write_one(root: str, params: SyntheticParams, index: int) -> dict:
    """Render and write image `index`; return its manifest entry (worker-process entry point)."""
    img = render_image(params, index)
    iid = image_id(index)
    root_p = Path(root)
    files = {"field": f"holograms/{iid}.tif", "truth": f"truth/{iid}.tif", "cells": f"truth/{iid}.json"}
    write_tiled(root_p / files["field"], [field_to_samples(p) for p in img.field])
    write_tiled(root_p / files["truth"], [img.phase, img.instance, img.cls], compression="zlib", level=1)
    (root_p / files["cells"]).write_text(json.dumps({"image": iid, "cells": img.cells}, separators=(",", ":")))
    stages = {s: sum(c["stage"] == s for c in img.cells) for s in _INFECTED_STAGES}
    return {
        "id": iid, "index": index, "height": params.height, "width": params.width, "angles": params.angles,
        "focus_distance_m": img.focus_distance_m, "seed": [params.seed, index],
        "cells": len(img.cells), "infected": sum(stages.values()), "stages": stages,
        "illumination": img.illumination,
        "files": {k: {"path": v, "bytes": (root_p / v).stat().st_size, "sha256": sha256_file(root_p / v)}
                  for k, v in files.items()},
    }


def _worker_init() -> None:
    """Keep freed arrays in the heap for reuse: without this, glibc maps and zero-fills every large
    temporary afresh and the kernel time (page faults) matches the compute time."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: serve arrays up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)   # M_TRIM_THRESHOLD: do not hand freed heap back to the kernel
    except (OSError, AttributeError):
        pass   # not glibc: only slower


def _mp_context():
    """fork when TensorFlow is not loaded in this process (fast start), spawn otherwise (fork after TF is unsafe)."""
    if "tensorflow" not in sys.modules and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def build_manifest(params: SyntheticParams, entries: list[dict]) -> dict:
    stages = {s: sum(e["stages"][s] for e in entries) for s in _INFECTED_STAGES}
    cells = sum(e["cells"] for e in entries)
    infected = sum(stages.values())
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_by": f"cellavie-hpc {__version__}",
        "encoding": {
            "field": {"pages": "one per illumination angle", "samples": ["real", "imag"], "dtype": "float32",
                      "layout": COMPLEX_ENCODING, "tile": list(TILE), "compression": "none"},
            "truth": {"pages": ["phase float32 rad (in focus, no background)", "instance uint32 (0 = background)",
                                "class uint8"], "tile": list(TILE), "compression": "zlib"},
            "cells": "JSON {image, cells: [{id, cy, cx, radius_px, bbox [y0, x0, y1, x1) , infected, stage, ...}]}",
            "classes": {"0": "background", **{str(i + 1): s for i, s in enumerate(STAGES)}},
            "focus_convention": "propagate the hologram by focus_distance_m to bring it into focus",
        },
        "parameters": asdict(params),
        "counts": {"images": len(entries), "cells": cells, "infected": infected, "stages": stages,
                   "parasitemia_observed": infected / cells if cells else 0.0},
        "images": entries,
    }


def generate_dataset(out: str | os.PathLike, images: int, size: int | tuple[int, int] = 2048,
                     parasitemia: float = 0.01, seed: int = 0, angles: int = 1, workers: int | None = None,
                     wavelength_m: float = 532e-9, pixel_size_m: float = 0.25e-6, progress: bool = True,
                     **params) -> dict:
    """Write `images` synthetic holograms with ground truth under `out`; return the manifest.

    `workers=None` uses every core; `workers=1` renders in this process. Output does not depend on
    `workers`. `out` must be absent or empty. The manifest is written last, so an interrupted run leaves
    no `manifest.json` and cannot be mistaken for a data set. Extra keyword arguments are
    `SyntheticParams` fields (e.g. `coverage`, `defocus_m`, `photons_per_pixel`).
    """
    height, width = (size, size) if isinstance(size, int) else size
    try:
        p = SyntheticParams(height=height, width=width, wavelength_m=wavelength_m, pixel_size_m=pixel_size_m,
                            parasitemia=parasitemia, angles=angles, seed=seed, **params)
    except TypeError as err:
        raise UserError(f"synthetic data set parameters: {err}") from None
    p.validate()
    if images < 1:
        raise UserError(f"images must be >= 1, got {images}")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"{root}: exists and is not an empty folder; choose another --out or remove it")
    (root / "holograms").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(exist_ok=True)
    workers = min(images, os.cpu_count() or 1) if workers is None else max(1, min(workers, images))
    entries = []
    try:
        with Progress(images, "generate", enabled=progress, unit="img") as bar:
            if workers == 1:
                for i in range(images):
                    entries.append(_write_one(str(root), p, i))
                    bar.update()
            else:
                with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init) as pool:
                    futures = [pool.submit(_write_one, str(root), p, i) for i in range(images)]
                    for fut in as_completed(futures):
                        entries.append(fut.result())
                        bar.update()
    except BaseException:
        shutil.rmtree(root / "holograms", ignore_errors=True)
        shutil.rmtree(root / "truth", ignore_errors=True)
        raise
    entries.sort(key=lambda e: e["index"])
    manifest = build_manifest(p, entries)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / "manifest.json")
    return manifest
