"""Autofocus of holograms of phase objects: scan propagation distances, keep the flattest amplitude.

A thin phase object (a red blood cell) has almost no amplitude contrast in focus; defocus turns phase
curvature into intensity contrast (transport of intensity) on both sides of the focus. So every metric
here is *smallest in focus*:
- `tamura`: Tamura coefficient sqrt(std(A) / mean(A)) of the amplitude A;
- `variance`: normalised amplitude variance var(A) / mean(A)^2;
- `gradient_variance`: variance of the amplitude gradient magnitude, / mean(A)^2.
The search is batched over fields and candidates (one FFT per field, one inverse FFT per candidate),
coarse-to-fine, with a parabolic refinement of the fine minimum.
"""
from __future__ import annotations

import numpy as np

from cellavie_hpc.optics.propagation import transfer_function

METRICS = ("tamura", "variance", "gradient_variance")


def _sharpness(amplitude, metric: str):
    """Metric per (field, candidate) of amplitudes (B, K, H, W); smaller is closer to focus."""
    import tensorflow as tf

    mean = tf.reduce_mean(amplitude, axis=[2, 3])
    if metric == "tamura":
        return tf.sqrt(tf.math.reduce_std(amplitude, axis=[2, 3]) / mean)
    if metric == "variance":
        return tf.math.reduce_variance(amplitude, axis=[2, 3]) / mean ** 2
    gy = amplitude[:, :, 1:, :-1] - amplitude[:, :, :-1, :-1]
    gx = amplitude[:, :, :-1, 1:] - amplitude[:, :, :-1, :-1]
    return tf.math.reduce_variance(tf.sqrt(gy ** 2 + gx ** 2), axis=[2, 3]) / mean ** 2


def focus_curve(field, distances_m, *, wavelength_m: float, pixel_size_m: float, medium_index: float = 1.0,
                metric: str = "tamura", border_px: int = 0, max_elements: int = 1 << 24) -> np.ndarray:
    """The metric of every field (B, H, W) or (H, W) at every candidate distance: float64 (B, K).

    `border_px` ignores a frame around the image where the periodic FFT wraps light in; candidates are
    processed in chunks of at most `max_elements` complex values to bound memory.
    """
    import tensorflow as tf

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    field = tf.convert_to_tensor(field)
    field = tf.cast(field, tf.complex64)[None] if field.shape.rank == 2 else tf.cast(field, tf.complex64)
    b, h, w = (int(s) for s in field.shape)
    if min(h, w) <= 2 * border_px + 2:
        raise ValueError(f"border_px {border_px} leaves nothing of a {h}x{w} field")
    distances = np.asarray(distances_m, np.float64).reshape(-1)
    spectrum = tf.signal.fft2d(field)[:, None]
    chunk = max(1, max_elements // (b * h * w))
    out = []
    for start in range(0, distances.size, chunk):
        transfer = transfer_function((h, w), distances[start:start + chunk], wavelength_m, pixel_size_m,
                                     medium_index)
        amplitude = tf.abs(tf.signal.ifft2d(spectrum * transfer[None]))
        amplitude = amplitude[:, :, border_px:h - border_px, border_px:w - border_px]
        out.append(_sharpness(amplitude, metric).numpy().astype(np.float64))
    return np.concatenate(out, axis=1)


def _parabola_vertex(z: np.ndarray, m: np.ndarray, k: int) -> float:
    """Sub-step minimum through three neighbouring samples (falls back to z[k] at the ends)."""
    if k == 0 or k == len(z) - 1:
        return float(z[k])
    m0, m1, m2 = m[k - 1], m[k], m[k + 1]
    denom = m0 - 2 * m1 + m2
    if denom <= 0:
        return float(z[k])
    step = z[k + 1] - z[k]
    return float(z[k] + 0.5 * step * (m0 - m2) / denom)


def autofocus(field, candidates_m=None, *, z_range_m: tuple[float, float] | None = None, wavelength_m: float,
              pixel_size_m: float, medium_index: float = 1.0, metric: str = "tamura", coarse_steps: int = 41,
              fine_steps: int = 21, border_px: int = 0):
    """In-focus distance of each field (B, H, W) -> float64 (B,), or of one field (H, W) -> float.

    Give either `candidates_m` (the coarse grid, sorted) or `z_range_m=(z_min, z_max)` (a coarse grid of
    `coarse_steps`). The fine scan covers the two coarse intervals around each field's coarse minimum
    with `fine_steps`, then a parabola through the best three fine samples gives the answer. The result
    is the distance to propagate the field by to bring it into focus.
    """
    if (candidates_m is None) == (z_range_m is None):
        raise ValueError("give exactly one of candidates_m or z_range_m")
    coarse = (np.sort(np.asarray(candidates_m, np.float64).reshape(-1)) if candidates_m is not None
              else np.linspace(z_range_m[0], z_range_m[1], coarse_steps))
    if coarse.size < 3 or fine_steps < 3:
        raise ValueError("need at least 3 coarse candidates and fine_steps >= 3")
    single = np.ndim(field) == 2
    fields = np.asarray(field)[None] if single else np.asarray(field)
    opts = dict(wavelength_m=wavelength_m, pixel_size_m=pixel_size_m, medium_index=medium_index, metric=metric,
                border_px=border_px)
    curves = focus_curve(fields, coarse, **opts)
    best = np.empty(len(fields))
    for i, k in enumerate(np.argmin(curves, axis=1)):
        lo, hi = coarse[max(k - 1, 0)], coarse[min(k + 1, coarse.size - 1)]
        fine = np.linspace(lo, hi, fine_steps)
        m = focus_curve(fields[i], fine, **opts)[0]
        best[i] = _parabola_vertex(fine, m, int(np.argmin(m)))
    return float(best[0]) if single else best


def autofocus_accuracy(fields, true_focus_m, **autofocus_kwargs) -> dict:
    """Autofocus error on holograms of known focus: mean/median/max absolute error in micrometres."""
    truth = np.asarray(true_focus_m, np.float64).reshape(-1)
    found = np.atleast_1d(autofocus(fields, **autofocus_kwargs))
    err_um = np.abs(found - truth) * 1e6
    return {"n": int(err_um.size), "mean_abs_error_um": float(err_um.mean()),
            "median_abs_error_um": float(np.median(err_um)), "max_abs_error_um": float(err_um.max()),
            "errors_um": [float(e) for e in err_um], "found_m": [float(z) for z in found]}
