"""Angular-spectrum propagation of complex fields, band-limited after Matsushima & Shimobaba (2009).

The transfer-function maths lives in ONE NumPy function, `angular_spectrum_kernel`, which returns two
distance-independent per-frequency arrays: the axial wavenumber `kz` and the largest distance at which
that frequency is still sampled without aliasing. The transfer function for any distance z is then
`H(z) = exp(i kz z)` where `|z| < max_distance_m`, else 0. `propagate` (TensorFlow, batched, GPU-ready)
and `propagate_np` (NumPy, used in generator worker processes where TensorFlow must not be imported
before fork) both apply that single rule, so they cannot drift apart.

TensorFlow is imported inside the TensorFlow functions only, so importing this module stays cheap and
fork-safe.
"""
from __future__ import annotations

import functools
import math

import numpy as np

PAD_MODES = ("none", "zero", "edge")


def _max_unaliased_distance(freq: np.ndarray, freq_step: float, wavelength_medium_m: float) -> np.ndarray:
    """Per frequency, the |z| below which the band limit |f| < 1/(lambda sqrt((2 df z)^2 + 1)) holds.

    Solving Matsushima & Shimobaba's limit for z gives |z| < sqrt(1/(lambda f)^2 - 1) / (2 df).
    """
    q = (wavelength_medium_m * freq) ** 2
    out = np.zeros_like(q)
    out[q == 0] = np.inf
    inside = (q > 0) & (q < 1)
    out[inside] = np.sqrt(1.0 / q[inside] - 1.0) / (2.0 * freq_step)
    return out


def angular_spectrum_kernel(shape: tuple[int, int], wavelength_m: float, pixel_size_m: float,
                            medium_index: float = 1.0, band_limit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Distance-independent pieces of the transfer function on an FFT grid of `shape` (H, W).

    Returns `(kz_rad_per_m, max_distance_m)`, both float64 (H, W) in FFT order. Evanescent frequencies
    get `max_distance_m = -1` so they are removed at every distance (including z = 0). Without
    `band_limit` every propagating frequency gets `inf`.
    """
    ny, nx = (int(s) for s in shape)
    if wavelength_m <= 0 or pixel_size_m <= 0 or medium_index <= 0:
        raise ValueError("wavelength_m, pixel_size_m and medium_index must be positive")
    fy = np.fft.fftfreq(ny, d=pixel_size_m)
    fx = np.fft.fftfreq(nx, d=pixel_size_m)
    wavelength_medium_m = wavelength_m / medium_index
    arg = (1.0 / wavelength_medium_m) ** 2 - fy[:, None] ** 2 - fx[None, :] ** 2
    propagating = arg > 0
    kz = 2.0 * np.pi * np.sqrt(np.where(propagating, arg, 0.0))
    if band_limit:
        zx = _max_unaliased_distance(fx, 1.0 / (nx * pixel_size_m), wavelength_medium_m)
        zy = _max_unaliased_distance(fy, 1.0 / (ny * pixel_size_m), wavelength_medium_m)
        max_distance = np.minimum(zy[:, None], zx[None, :])
    else:
        max_distance = np.full((ny, nx), np.inf)
    return kz, np.where(propagating, max_distance, -1.0)


@functools.lru_cache(maxsize=8)
def _cached_kernel(shape, wavelength_m, pixel_size_m, medium_index, band_limit):
    kz, max_distance = angular_spectrum_kernel(shape, wavelength_m, pixel_size_m, medium_index, band_limit)
    kz.flags.writeable = False
    max_distance.flags.writeable = False
    return kz, max_distance


def fast_fft_size(n: int) -> int:
    """The smallest size >= n with no prime factor above 5 (FFT libraries are fastest on those)."""
    size = n
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def spread_margin_px(distance_m, pixel_size_m: float, max_angle_deg: float = 45.0, multiple: int = 64) -> int:
    """Padding (pixels per side) that holds the light a point sends within `max_angle_deg` of the axis over
    `distance_m` (the largest |z| of a batch), rounded up to `multiple` so few grid shapes (and cached
    kernels) occur. Measured on 2048-px holograms refocused by 15 and 33 um (margins 64 and 192 px): the
    phase error of doubling the grid (0.13 rad within 20 px of the border at 33 um, 0.43 unpadded) on a
    grid 2.8x smaller or less (docs/screening.rst)."""
    reach = float(np.max(np.abs(distance_m))) * math.tan(math.radians(max_angle_deg)) / pixel_size_m
    return int(math.ceil(reach / multiple) * multiple)


def _padding(n: int, pad: str, pad_px: int | None = None) -> tuple[int, int]:
    """(before, after) for `zero`/`edge`: `pad_px` before and the rest up to a fast FFT size after, or
    (`pad_px=None`) half the size on each side, doubling it; none for `none`."""
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")
    if pad == "none":
        return 0, 0
    if pad_px is None:
        return n // 2, n - n // 2
    if pad_px < 0:
        raise ValueError(f"pad_px must be >= 0, got {pad_px}")
    return pad_px, fast_fft_size(n + 2 * pad_px) - n - pad_px


def _edge_indices(n: int, before: int, after: int) -> np.ndarray:
    """Gather indices that repeat the first/last row: edge padding as one gather (NumPy and TF)."""
    return np.clip(np.arange(-before, n + after), 0, n - 1)


def _as_batch(distance_m, batch: int) -> np.ndarray:
    z = np.asarray(distance_m, dtype=np.float64).reshape(-1)
    if z.size == 1:
        z = np.repeat(z, batch)
    if z.size != batch:
        raise ValueError(f"distance_m has {z.size} values for {batch} fields; give one scalar or one per field")
    return z


def transfer_function_np(shape: tuple[int, int], distance_m, wavelength_m: float, pixel_size_m: float,
                         medium_index: float = 1.0, band_limit: bool = True) -> np.ndarray:
    """The complex64 transfer functions (B, H, W), FFT order, one per distance (float64 phase, then cast)."""
    kz, max_distance = _cached_kernel(tuple(shape), float(wavelength_m), float(pixel_size_m),
                                      float(medium_index), bool(band_limit))
    z = np.asarray(distance_m, dtype=np.float64).reshape(-1)
    out = np.empty((z.size,) + kz.shape, np.complex64)
    for i, zi in enumerate(z):
        phase = np.mod(kz * zi, 2.0 * np.pi).astype(np.float32)
        h = np.cos(phase) + 1j * np.sin(phase)
        out[i] = np.where(abs(zi) < max_distance, h, 0)
    return out


def propagate_np(field, distance_m, wavelength_m: float, pixel_size_m: float, medium_index: float = 1.0,
                 pad: str = "none", band_limit: bool = True, pad_px: int | None = None) -> np.ndarray:
    """NumPy twin of `propagate` (same kernel, complex64 FFTs): for worker processes without TensorFlow."""
    field = np.asarray(field)
    single = field.ndim == 2
    batch = field[None] if single else field
    if batch.ndim != 3:
        raise ValueError(f"field must be (H, W) or (B, H, W), got shape {field.shape}")
    b, h, w = batch.shape
    z = _as_batch(distance_m, b)
    (pt, pb), (pl, pr) = _padding(h, pad, pad_px), _padding(w, pad, pad_px)
    batch = batch.astype(np.complex64, copy=False)
    if pad == "zero":
        batch = np.pad(batch, ((0, 0), (pt, pb), (pl, pr)))
    elif pad == "edge":
        batch = batch[:, _edge_indices(h, pt, pb)][:, :, _edge_indices(w, pl, pr)]
    shape = batch.shape[1:]
    out = np.empty((b, h, w), np.complex64)
    for i in range(b):
        spectrum = np.fft.fft2(batch[i])
        spectrum *= transfer_function_np(shape, z[i], wavelength_m, pixel_size_m, medium_index, band_limit)[0]
        out[i] = np.fft.ifft2(spectrum)[pt:pt + h, pl:pl + w]
    return out[0] if single else out


def transfer_function(shape: tuple[int, int], distance_m, wavelength_m: float, pixel_size_m: float,
                      medium_index: float = 1.0, band_limit: bool = True):
    """TensorFlow complex64 transfer functions (Z, H, W), FFT order, one per distance in `distance_m`."""
    import tensorflow as tf

    kz, max_distance = _cached_kernel(tuple(int(s) for s in shape), float(wavelength_m), float(pixel_size_m),
                                      float(medium_index), bool(band_limit))
    z = distance_m if tf.is_tensor(distance_m) else np.asarray(distance_m, np.float64)   # no float32 detour
    z = tf.reshape(tf.cast(z, tf.float64), [-1])
    phase = tf.cast(tf.math.floormod(tf.constant(kz)[None] * z[:, None, None], 2.0 * math.pi), tf.float32)
    keep = tf.abs(z)[:, None, None] < tf.constant(max_distance)[None]
    return tf.where(keep, tf.complex(tf.cos(phase), tf.sin(phase)), tf.zeros_like(phase, tf.complex64))


def propagate(field, distance_m, wavelength_m: float, pixel_size_m: float, medium_index: float = 1.0,
              pad: str = "none", band_limit: bool = True, pad_px: int | None = None):
    """Propagate complex fields (B, H, W) or (H, W) by `distance_m` (scalar or one per field), in TensorFlow.

    Positive distances propagate along +z. `pad` (`zero` or `edge`) enlarges the grid to suppress the
    wrap-around of the periodic FFT, by `pad_px` per side (`spread_margin_px`; up to a fast FFT size) or
    by default to twice the size; the result is cropped back. The spatial shape must be static.
    Returns complex64 with the input's rank.
    """
    import tensorflow as tf

    field = tf.convert_to_tensor(field)
    if field.dtype != tf.complex64:
        field = tf.cast(field, tf.complex64)
    single = field.shape.rank == 2
    batch = field[None] if single else field
    if batch.shape.rank != 3 or batch.shape[1] is None or batch.shape[2] is None:
        raise ValueError(f"field must be (H, W) or (B, H, W) with static H, W; got shape {field.shape}")
    h, w = int(batch.shape[1]), int(batch.shape[2])
    (pt, pb), (pl, pr) = _padding(h, pad, pad_px), _padding(w, pad, pad_px)
    if pad == "zero":
        batch = tf.pad(batch, [[0, 0], [pt, pb], [pl, pr]])
    elif pad == "edge":
        batch = tf.gather(tf.gather(batch, _edge_indices(h, pt, pb), axis=1), _edge_indices(w, pl, pr), axis=2)
    transfer = transfer_function((h + pt + pb, w + pl + pr), distance_m, wavelength_m, pixel_size_m,
                                 medium_index, band_limit)
    if batch.shape[0] is not None and transfer.shape[0] not in (1, batch.shape[0]):
        raise ValueError(f"distance_m has {transfer.shape[0]} values for {batch.shape[0]} fields; "
                         "give one scalar or one per field")
    out = tf.signal.ifft2d(tf.signal.fft2d(batch) * transfer)[:, pt:pt + h, pl:pl + w]
    return out[0] if single else out
