"""Angular-spectrum propagation: reversibility, energy, analytic plane waves, NumPy float64 reference."""
import numpy as np
import pytest

from cellavie_hpc.optics.propagation import (angular_spectrum_kernel, fast_fft_size, propagate, propagate_np,
                                             spread_margin_px)

WL, PX, N_MED = 532e-9, 0.25e-6, 1.335


def _smooth_field(shape, seed=0, cutoff=0.25):
    """A random complex field whose spectrum is confined to |f| < cutoff * Nyquist (band-limited)."""
    rng = np.random.default_rng(seed)
    spec = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.fftfreq(shape[-1])[None, :]
    spec *= np.hypot(fy, fx) < 0.5 * cutoff
    field = np.fft.ifft2(spec)
    return (field / np.abs(field).std()).astype(np.complex64)


def _reference_float64(field, z, wl, px, n, band_limit):
    """Independent float64 implementation written from Matsushima & Shimobaba (2009), eq. 13/17."""
    h, w = field.shape
    fy, fx = np.meshgrid(np.fft.fftfreq(h, px), np.fft.fftfreq(w, px), indexing="ij")
    lam = wl / n
    arg = 1 / lam ** 2 - fx ** 2 - fy ** 2
    tf = np.exp(2j * np.pi * z * np.sqrt(np.maximum(arg, 0))) * (arg > 0)
    if band_limit:
        du, dv = 1 / (w * px), 1 / (h * px)
        ulim = 1 / (lam * np.sqrt((2 * du * z) ** 2 + 1))
        vlim = 1 / (lam * np.sqrt((2 * dv * z) ** 2 + 1))
        tf = tf * (np.abs(fx) < ulim) * (np.abs(fy) < vlim)
    return np.fft.ifft2(np.fft.fft2(field.astype(np.complex128)) * tf)


def test_forward_then_backward_returns_the_field():
    field = _smooth_field((2, 96, 128), cutoff=0.6)
    out = propagate(propagate(field, 30e-6, WL, PX, N_MED, band_limit=False), -30e-6, WL, PX, N_MED,
                    band_limit=False).numpy()
    assert np.max(np.abs(out - field)) < 1e-4 * np.abs(field).max()


def test_energy_is_conserved_for_a_band_limited_field():
    field = _smooth_field((64, 64), seed=1, cutoff=0.2)      # |f| < 0.4 cycles/um: inside the limit to 40 um
    energy = np.sum(np.abs(field) ** 2)
    for z in (5e-6, 40e-6, -40e-6):
        out = propagate(field, z, WL, PX, N_MED).numpy()
        assert np.sum(np.abs(out) ** 2) == pytest.approx(energy, rel=1e-5)
    # at 200 um the band limit (0.1 cycles/um on this 16 um grid) cuts what would alias: energy drops
    assert np.sum(np.abs(propagate(field, -200e-6, WL, PX, N_MED).numpy()) ** 2) < 0.9 * energy


def test_tilted_plane_wave_only_gains_the_analytic_phase():
    h, w = 64, 80
    ky, kx = 3, -5                         # on the FFT grid, so the wave is periodic
    fy, fx = ky / (h * PX), kx / (w * PX)
    yy, xx = np.mgrid[:h, :w]
    wave = np.exp(2j * np.pi * (ky * yy / h + kx * xx / w)).astype(np.complex64)
    z = 23.7e-6
    kz = 2 * np.pi * np.sqrt((N_MED / WL) ** 2 - fx ** 2 - fy ** 2)
    out = propagate(wave, z, WL, PX, N_MED).numpy()
    np.testing.assert_allclose(out, wave * np.exp(1j * kz * z), atol=2e-5)


@pytest.mark.parametrize("band_limit", [True, False])
def test_matches_a_float64_numpy_reference(band_limit):
    field = _smooth_field((48, 72), seed=2, cutoff=0.9)
    z = 150e-6                              # long enough for the band limit to cut frequencies
    ref = _reference_float64(field, z, WL, PX, N_MED, band_limit)
    for out in (propagate(field, z, WL, PX, N_MED, band_limit=band_limit).numpy(),
                propagate_np(field, z, WL, PX, N_MED, band_limit=band_limit)):
        assert np.max(np.abs(out - ref)) < 2e-5 * np.abs(ref).max()


def test_band_limit_removes_frequencies_that_would_alias_at_long_distance():
    kz, max_d = angular_spectrum_kernel((64, 64), WL, PX, N_MED, band_limit=True)
    assert max_d[0, 0] == np.inf                       # DC is never limited
    assert (max_d[kz == 0] == -1).all()                 # evanescent: always removed
    assert (max_d < 1e-3).mean() > 0.5                  # most of the grid is cut at 1 mm
    _, unlimited = angular_spectrum_kernel((64, 64), WL, PX, N_MED, band_limit=False)
    assert np.isinf(unlimited[kz > 0]).all()


def test_batch_with_one_distance_per_field_equals_separate_calls():
    field = _smooth_field((3, 32, 32), seed=3)
    z = np.array([-12e-6, 0.0, 31e-6])
    batched = propagate(field, z, WL, PX, N_MED).numpy()
    for i in range(3):
        np.testing.assert_allclose(batched[i], propagate(field[i], z[i], WL, PX, N_MED).numpy(), atol=1e-6)


@pytest.mark.parametrize("pad", ["zero", "edge"])
def test_padding_suppresses_wrap_around(pad):
    h = 64
    field = np.ones((h, h), np.complex64)
    field[28:36, 2:10] = np.exp(1j * 2.0)               # a phase object near the left border
    z = 20e-6
    wide = np.pad(field, h, mode="edge" if pad == "edge" else "constant")    # 3x grid: no wrap reaches the centre
    ref = _reference_float64(wide, z, WL, PX, N_MED, True)[h:2 * h, h:2 * h]
    padded = propagate(field, z, WL, PX, N_MED, pad=pad).numpy()
    periodic = propagate(field, z, WL, PX, N_MED, pad="none").numpy()
    far_right = np.s_[:, 54:]                           # light wrapping around lands here without padding
    err_pad = np.abs(padded[far_right] - ref[far_right]).max()
    err_none = np.abs(periodic[far_right] - ref[far_right]).max()
    assert err_pad < err_none / 3
    np.testing.assert_allclose(padded, propagate_np(field, z, WL, PX, N_MED, pad=pad), atol=2e-5)


def test_a_margin_of_the_light_spread_matches_the_doubled_grid():
    h = 128
    field = np.ones((h, h), np.complex64)
    field[60:68, 2:10] = np.exp(1j * 2.0)               # a phase object at the left border
    z = 20e-6                                           # 45 degree reach: 80 px, margin 128 px (multiple 64)
    margin = spread_margin_px(z, PX)
    assert margin == 128
    doubled = propagate(field, z, WL, PX, N_MED, pad="edge").numpy()
    fitted = propagate(field, z, WL, PX, N_MED, pad="edge", pad_px=margin).numpy()
    periodic = propagate(field, z, WL, PX, N_MED, pad="none").numpy()
    assert fitted.shape == (h, h)
    err_fitted, err_none = np.abs(fitted - doubled).max(), np.abs(periodic - doubled).max()
    assert err_fitted < err_none / 10, (err_fitted, err_none)
    np.testing.assert_allclose(fitted, propagate_np(field, z, WL, PX, N_MED, pad="edge", pad_px=margin), atol=2e-5)


def test_fast_fft_sizes_and_margins():
    assert [fast_fft_size(n) for n in (1, 7, 2048, 2049, 2304, 2433)] == [1, 8, 2048, 2160, 2304, 2500]
    assert spread_margin_px(33.6e-6, 0.25e-6) == 192          # 134 px of reach -> 3 x 64
    assert spread_margin_px([-5e-6, 2e-6], 0.25e-6) == 64     # the largest |z| of a batch
    assert spread_margin_px(0.0, 0.25e-6) == 0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="pad"):
        propagate_np(np.ones((8, 8)), 1e-6, WL, PX, pad="mirror")
    with pytest.raises(ValueError, match="pad_px"):
        propagate_np(np.ones((8, 8)), 1e-6, WL, PX, pad="edge", pad_px=-1)
    with pytest.raises(ValueError, match="one per field"):
        propagate_np(np.ones((3, 8, 8)), [1e-6, 2e-6], WL, PX)
    with pytest.raises(ValueError, match="positive"):
        angular_spectrum_kernel((8, 8), -1.0, PX)
