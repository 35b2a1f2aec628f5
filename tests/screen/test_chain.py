"""The screening chain end to end on two small holograms (physics refocus, threshold segmentation)."""
import json

import numpy as np
import pandas as pd
import pytest

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.launch.job_env import JobEnvironment
from cellavie_hpc.records.schema import validate
from cellavie_hpc.screen.chain import (ScreenOptions, ScreeningChain, components, extract_tiles,
                                       flatten_background, split_cells, stitch_tiles, tile_origins)
from cellavie_hpc.screen.models_dir import load_spec
from cellavie_hpc.screen.run import rank_images, screen_sample


def test_flatten_background_removes_offset_and_tilt():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    obj = np.zeros((256, 256))
    obj[100:140, 100:140] = 2.0                     # one "cell" of 2 rad on 2 % of the area
    background = 2.9 + 0.031 * yy - 0.017 * xx      # wraps several times over the image
    field = np.exp(1j * (obj + background)) + 0.005 * rng.standard_normal((256, 256))
    phase = flatten_background(field)
    assert np.abs(phase - obj).max() < 0.05


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.any([(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2 for cy, cx in centres], axis=0)


def test_touching_cells_are_split_at_their_neck_and_single_cells_are_not():
    # a touching pair (centres 26 px apart, radius 15: overlapping by 4 px), three isolated cells
    centres = [(60, 60), (60, 86), (150, 60), (150, 150), (60, 160)]
    mask = _discs((220, 220), centres, 15)
    labels, n = split_cells(mask, split_distance_px=10)
    assert n == 5
    found = components(mask, 150, 4000, split_distance_px=10)
    got = sorted(zip(np.round(found["cy"]).tolist(), np.round(found["cx"]).tolist()))
    for (ty, tx), (gy, gx) in zip(sorted(centres), got):
        assert abs(ty - gy) <= 1.5 and abs(tx - gx) <= 1.5
    # without splitting the pair is one region centred between the two cells: the bug this fixes
    merged = components(mask, 150, 4000, split_distance_px=0)
    assert len(merged["cy"]) == 4 and np.any(np.isclose(merged["cx"], 73, atol=1) & np.isclose(merged["cy"], 60, atol=1))


def test_cells_cut_by_the_image_border_are_kept_from_their_own_minimum_area():
    mask = _discs((120, 120), [(60, -9), (60, 60)], 15)        # ~110 px of the first cell are visible
    kept = components(mask, 150, 4000, border_min_area_px=80)
    assert len(kept["cy"]) == 2 and kept["area_px"].min() < 150
    assert len(components(mask, 150, 4000)["cy"]) == 1            # default: the same minimum everywhere


def test_tiles_cover_the_image_and_stitch_back_exactly():
    image = np.arange(300 * 200, dtype=np.float32).reshape(300, 200)
    origins = tile_origins(300, 200, 128, 32)
    tiles = extract_tiles(image, origins, 128)
    assert tiles.shape == (len(origins), 128, 128)
    np.testing.assert_array_equal(stitch_tiles(tiles, origins, (300, 200), 32), image)


def test_screen_finds_the_cells_and_writes_every_output(sample_dir, models_dir, tmp_path):
    out = tmp_path / "out"
    summary = screen_sample(sample_dir, models_dir, out, ScreenOptions(tile=256, overlap=64), evaluate=True,
                            overlays="all", progress=None)
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(pd.read_csv(out / "cells.csv")) == len(cells) == summary["cells_screened"] > 0
    assert summary["infected_found"] == int(cells["infected"].sum())
    assert summary["parasitaemia"] == pytest.approx(summary["infected_found"] / len(cells))
    ev = json.loads((out / "evaluation.json").read_text())
    truth_cells = ev["counts"]["cells"]
    assert ev["detection_recall"] > 0.8, ev["counts"]          # cells found by physics + threshold
    assert ev["counts"]["duplicates"] <= 0.02 * truth_cells
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["img-00000.png", "img-00001.png"]
    records = [json.loads(line) for line in (out / "records" / "rank-00000.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["header", "step", "step", "final"]
    assert all(validate(r) == [] for r in records)
    assert sum(r["samples"] for r in records if r["kind"] == "step") == len(cells) == records[-1]["samples"]
    assert "cells/s" in summary["throughput"]["line"]


def test_two_ranks_split_images_and_combine_to_the_single_rank_result(sample_dir, models_dir, tmp_path):
    shares = [rank_images(5, 2, r).tolist() for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3, 4] and sorted(map(len, shares)) == [2, 3]
    options = ScreenOptions(tile=256, overlap=64)
    single = screen_sample(sample_dir, models_dir, tmp_path / "one", options, overlays="none", progress=None)
    first = screen_sample(sample_dir, models_dir, tmp_path / "two", options, overlays="none", progress=None,
                          job=JobEnvironment(rank=1, world_size=2))
    assert first["partial"] and first["images"] == rank_images(2, 2, 1).tolist()
    combined = screen_sample(sample_dir, models_dir, tmp_path / "two", options, overlays="none", progress=None,
                             job=JobEnvironment(rank=0, world_size=2))
    assert combined["cells_screened"] == single["cells_screened"]
    a = pd.read_parquet(tmp_path / "one" / "cells.parquet")
    b = pd.read_parquet(tmp_path / "two" / "cells.parquet")
    np.testing.assert_allclose(a[["cy", "cx", "p_infected"]], b[["cy", "cx", "p_infected"]], atol=1e-4)
    for rank in (0, 1):
        lines = (tmp_path / "two" / "records" / f"rank-{rank:05d}.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["world_size"] == 2 and json.loads(lines[-1])["status"] == "completed"


def test_batched_xla_chain_matches_the_naive_one(sample_dir, models_dir):
    from cellavie_hpc.data.dataset import open_dataset

    ds = open_dataset(sample_dir)
    fast = ScreeningChain(models_dir, ScreenOptions(tile=256, overlap=64, xla=True))
    naive = ScreeningChain(models_dir, ScreenOptions(tile=256, overlap=64).naive())
    a, b = next(fast.screen(ds, [0])), next(naive.screen(ds, [0]))
    assert a.n_cells == b.n_cells > 20
    np.testing.assert_allclose(a.cells["p_infected"], b.cells["p_infected"], atol=1e-4)


def test_bad_inputs_are_named(tmp_path, sample_dir, models_dir):
    with pytest.raises(DataError, match="chain.json"):
        load_spec(tmp_path)
    (tmp_path / "chain.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_spec(tmp_path)
    with pytest.raises(UserError, match="--overlap"):
        ScreenOptions(tile=128, overlap=128)
    with pytest.raises(UserError, match="cnn needs a refocus network"):
        ScreeningChain(models_dir, ScreenOptions(refocus="cnn"))


def test_cli_screens_the_array_task_sample(sample_dir, models_dir, tmp_path, monkeypatch, capsys):
    from cellavie_hpc.cli import main

    listing = tmp_path / "samples.txt"
    listing.write_text(f"/nonexistent/sample-0\n{sample_dir}\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    code = main(["screen", "--samples-from", str(listing), "--models", str(models_dir), "--out", str(tmp_path / "o"),
                 "--max-images", "1", "--tile", "256", "--overlays", "none", "--quiet"])
    assert code == 0
    summary = json.loads((tmp_path / "o" / sample_dir.name / "summary.json").read_text())
    assert summary["images"] == 1 and summary["cells_screened"] > 20
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert main(["screen", "--samples-from", str(listing), "--models", str(models_dir), "--out", str(tmp_path / "o")]) == 2
    assert "array task 7 but the file lists 2 samples" in capsys.readouterr().err


@pytest.fixture(scope="module")
def learned_models(tmp_path_factory):
    """A chain whose every stage is a network (untrained, seeded): refocus CNN, U-Net, detector, classifier."""
    import keras

    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

    keras.utils.set_random_seed(1)
    root = tmp_path_factory.mktemp("learned")
    entries = {"refocus": NetworkEntry(name="refocus", file="refocus.keras", patch=128, in_channels=2),
               "unet": NetworkEntry(name="unet", file="unet.keras", patch=128),
               "detector": NetworkEntry(name="detector", file="detector.keras", patch=128),
               "classifier": NetworkEntry(name="classifier", file="classifier.keras", patch=64)}
    models = {k: build_model(k, "tiny", e.patch, e.in_channels) for k, e in entries.items()}
    # untrained, so give the outputs that decide what is found a bias: the U-Net calls every pixel cell
    # interior, the detector's boxes are 28 px (7 grid cells of 4 px) instead of under a pixel
    models["unet"].get_layer("logits_conv").bias.assign(np.array([0.0, 5.0, 0.0], np.float32))
    models["detector"].get_layer("size_conv").bias.assign(np.array([7.0, 7.0], np.float32))
    save_chain(root, ChainSpec(**entries, segmentation="unet", detection="detector", detector_score=0.0), models)
    return root


def test_learned_chain_refocuses_segments_and_detects_with_its_networks(sample_dir, learned_models):
    from cellavie_hpc.data.dataset import open_dataset
    from cellavie_hpc.screen.merge import box_iomin

    ds = open_dataset(sample_dir)
    options = ScreenOptions(refocus="cnn", tile=256, overlap=64)
    fast = ScreeningChain(learned_models, options)
    assert sorted(fast.networks) == ["classifier", "detector", "refocus", "unet"]
    a = next(fast.screen(ds, [0]))
    b = next(ScreeningChain(learned_models, options.naive()).screen(ds, [0]))
    assert a.phase.shape == (512, 512) and np.isnan(a.focus_distance_m)
    np.testing.assert_allclose(a.phase, b.phase, atol=1e-4)      # batched tiles = one tile per call
    assert a.n_cells == b.n_cells > 0
    boxes = a.cells["box"]
    assert np.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 512) & (boxes[:, 2:] > boxes[:, :2]))
    inner = boxes[np.all((boxes[:, :2] > 0) & (boxes[:, 2:] < 512), axis=1)]     # not clipped by the border
    assert len(inner) > 0.8 * len(boxes)
    assert (box_iomin(inner, inner) - np.eye(len(inner))).max() <= 0.5  # merged across tiles: no cell twice
    mask = fast.segment(a.phase)
    iy, ix = a.cells["cy"].astype(int), a.cells["cx"].astype(int)
    assert mask[iy, ix].all()                                       # detections are kept only on the U-Net's cells
    np.testing.assert_allclose(a.cells["p_infected"], b.cells["p_infected"], atol=1e-4)
