"""Autofocus on synthetic holograms whose true focus is known."""
import numpy as np
import pytest

from cellavie_hpc.data.synthetic import SyntheticParams, render_image
from cellavie_hpc.optics.autofocus import autofocus, autofocus_accuracy, focus_curve

P = SyntheticParams(height=256, width=256, parasitemia=0.1, seed=3)
OPTS = dict(wavelength_m=P.wavelength_m, pixel_size_m=P.pixel_size_m, medium_index=P.medium_index)


@pytest.fixture(scope="module")
def holograms():
    images = [render_image(P, i) for i in range(4)]
    return np.stack([im.field[0] for im in images]), np.array([im.focus_distance_m for im in images])


@pytest.mark.parametrize("metric", ["tamura", "variance"])
def test_autofocus_finds_the_known_focus_within_half_a_micrometre(holograms, metric):
    fields, truth = holograms
    acc = autofocus_accuracy(fields, truth, z_range_m=(-50e-6, 50e-6), metric=metric, coarse_steps=21,
                             fine_steps=11, border_px=16, **OPTS)
    assert acc["n"] == 4
    assert acc["mean_abs_error_um"] < 0.3 and acc["max_abs_error_um"] < 0.5, acc
    assert set(np.sign(acc["found_m"])) == set(np.sign(truth))


def test_metric_is_smallest_near_focus_and_candidates_api_agrees(holograms):
    fields, truth = holograms
    z = truth[0] + np.array([-20e-6, -8e-6, 0.0, 8e-6, 20e-6])
    curve = focus_curve(fields[0], z, metric="tamura", border_px=16, **OPTS)[0]
    assert np.argmin(curve) == 2 and curve[0] > curve[1] > curve[2] < curve[3] < curve[4]
    found = autofocus(fields[0], np.linspace(-50e-6, 50e-6, 21), metric="tamura", fine_steps=11,
                      border_px=16, **OPTS)
    assert isinstance(found, float) and abs(found - truth[0]) < 0.5e-6


def test_bad_arguments_are_rejected(holograms):
    fields, _ = holograms
    with pytest.raises(ValueError, match="exactly one"):
        autofocus(fields, **OPTS)
    with pytest.raises(ValueError, match="metric"):
        focus_curve(fields, [0.0], metric="brenner", **OPTS)
