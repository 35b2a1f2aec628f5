"""Synthetic holograms: ground truth consistent with the rendered rasters, physics, determinism, manifest."""
import json

import numpy as np
import pytest

from cellavie_hpc.cli import main as cli_main
from cellavie_hpc.data.dataset import open_dataset
from cellavie_hpc.data.synthetic import STAGES, SyntheticParams, exact_count, generate_dataset, render_image
from cellavie_hpc.errors import UserError
from cellavie_hpc.optics.propagation import propagate_np

SMALL = dict(size=192, parasitemia=0.3, seed=11, angles=2, progress=False)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    generate_dataset(root, images=3, workers=1, **SMALL)
    return open_dataset(root)


def test_masks_match_the_listed_cells(small_ds):
    exact_bbox = total = 0
    for i in range(len(small_ds)):
        info = small_ds.images[i]
        truth = small_ds.read_truth_patch(i, 0, 0, info.height, info.width)
        cells = small_ds.cells(i)
        inst = truth["instance"]
        assert sorted(np.unique(inst[inst > 0]).tolist()) == [c["id"] for c in cells]
        for c in cells:
            ys, xs = np.nonzero(inst == c["id"])
            y0, x0, y1, x1 = c["bbox"]
            # occlusion by a mildly overlapping neighbour may only shrink the visible footprint
            assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1
            assert max(ys.min() - y0, y1 - 1 - ys.max(), xs.min() - x0, x1 - 1 - xs.max()) <= 2
            exact_bbox += (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)
            total += 1
            if not c["clipped"]:
                assert abs(ys.mean() - c["cy"]) < 1.0 and abs(xs.mean() - c["cx"]) < 1.0
                assert 0.8 < np.sqrt(len(ys) / np.pi) / c["radius_px"] < 1.1
            expected_cls = STAGES.index(c["stage"]) + 1
            assert (truth["cls"][inst == c["id"]] == expected_cls).all()
            assert c["infected"] == (c["stage"] != "healthy")
        assert ((truth["cls"] == 0) == (inst == 0)).all()
        assert np.all(truth["phase"][inst == 0] == 0) and truth["phase"][inst > 0].mean() > 0.5
    assert total > 40 and exact_bbox / total > 0.9


def test_manifest_counts_equal_the_cell_lists(small_ds):
    m = small_ds.manifest
    cells = [c for i in range(len(small_ds)) for c in small_ds.cells(i)]
    assert m["counts"]["cells"] == len(cells)
    assert m["counts"]["infected"] == sum(c["infected"] for c in cells)
    for stage in STAGES[1:]:
        assert m["counts"]["stages"][stage] == sum(c["stage"] == stage for c in cells)
    for i, entry in enumerate(m["images"]):
        listed = small_ds.cells(i)
        assert entry["cells"] == len(listed)
        n_inf = sum(c["infected"] for c in listed)
        assert entry["infected"] == n_inf
        assert np.floor(0.3 * len(listed)) <= n_inf <= np.ceil(0.3 * len(listed))    # exact-count sampling
    assert m["counts"]["infected"] > 0 and m["parameters"]["angles"] == 2


def test_refocusing_the_hologram_recovers_the_in_focus_phase(small_ds):
    """Each plane, with its recorded background removed and its illumination tilt restored, propagated by
    the recorded focus distance gives back the truth phase (up to a constant)."""
    inner = np.s_[48:-48, 48:-48]          # away from the border, which sees cells outside the image
    for i in range(len(small_ds)):
        info = small_ds.images[i]
        field = small_ds.read_field(i)
        truth = small_ds.read_truth_patch(i, 0, 0, info.height, info.width)
        assert field.shape == (2, info.height, info.width) and 10e-6 <= abs(info.focus_distance_m) <= 40e-6
        yy, xx = np.mgrid[:info.height, :info.width]
        for plane, ill in zip(field, small_ds.manifest["images"][i]["illumination"]):
            (gy, gx), (fy, fx) = ill["background_tilt_rad_per_px"], ill["frequency_per_m"]
            plane = plane * np.exp(-1j * (ill["background_offset_rad"] + gy * yy + gx * xx))
            carrier = np.exp(2j * np.pi * (fy * yy + fx * xx) * small_ds.pixel_size_m)
            refocused = np.conj(carrier) * propagate_np(plane * carrier, info.focus_distance_m, small_ds.wavelength_m,
                                                        small_ds.pixel_size_m, small_ds.medium_index)
            rms = []
            for f in (refocused, plane):
                psi = (f * np.exp(-1j * truth["phase"]))[inner]
                rms.append(np.sqrt(np.mean(np.angle(psi * np.exp(-1j * np.angle(psi.mean()))) ** 2)))
            assert rms[0] < 0.08 and rms[1] > 0.3, rms


def test_same_seed_same_image_and_different_seed_different_image():
    p = SyntheticParams(height=128, width=160, seed=5, parasitemia=0.2)
    a, b = render_image(p, 3), render_image(p, 3)
    for name in ("field", "phase", "instance", "cls"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.cells == b.cells and a.focus_distance_m == b.focus_distance_m
    c = render_image(SyntheticParams(height=128, width=160, seed=6, parasitemia=0.2), 3)
    assert not np.array_equal(a.instance, c.instance)


def test_multi_process_output_equals_single_process(tmp_path):
    m1 = generate_dataset(tmp_path / "one", images=3, workers=1, **SMALL)
    m2 = generate_dataset(tmp_path / "two", images=3, workers=2, **SMALL)
    assert [e["files"] for e in m1["images"]] == [e["files"] for e in m2["images"]]
    assert m1["counts"] == m2["counts"]


def test_exact_count_sampling_has_the_right_expectation():
    rng = np.random.default_rng(0)
    for expected in (1e-5 * 1400, 0.37, 2.5):
        draws = np.array([exact_count(rng, expected) for _ in range(100_000)])
        assert set(np.unique(draws)) <= {np.floor(expected), np.ceil(expected)}
        assert draws.mean() == pytest.approx(expected, rel=0.08, abs=3e-4)


def test_low_parasitemia_is_zero_or_one_infected_cell_per_image():
    p = SyntheticParams(height=256, width=256, parasitemia=1e-5, seed=2)
    infected = [sum(c["infected"] for c in render_image(p, i).cells) for i in range(3)]
    assert all(n in (0, 1) for n in infected)


def test_bad_parameters_and_non_empty_output_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="parasitemia"):
        generate_dataset(tmp_path / "a", images=1, size=64, parasitemia=1.5, progress=False)
    with pytest.raises(UserError, match="coverage"):
        generate_dataset(tmp_path / "b", images=1, size=64, coverage=0.9, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="not an empty folder"):
        generate_dataset(tmp_path / "full", images=1, size=64, progress=False)


def test_cli_generates_reads_back_and_verify_catches_tampering(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["generate", "--out", str(out), "--images", "2", "--size", "96", "--seed", "4",
                     "--workers", "1", "--no-progress"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert cli_main(["generate", "--out", str(out), "--verify"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    truth = out / manifest["images"][1]["files"]["cells"]["path"]
    truth.write_text(truth.read_text().replace('"healthy"', '"HEALTHY"', 1))    # same size, other bytes
    assert cli_main(["generate", "--out", str(out), "--verify"]) == 2
    assert "checksum" in capsys.readouterr().err
