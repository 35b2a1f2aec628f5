"""tf.data pipeline: exact pixels at the planned tiles, targets per task, aligned augmentation, determinism."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")

from cellavie_hpc.cli import main as cli_main  # noqa: E402
from cellavie_hpc.data.dataset import open_dataset  # noqa: E402
from cellavie_hpc.data.pipeline import (  # noqa: E402
    _balanced_indices, build_pipeline, cell_labels, clear_image_cache, reflect_indices, task_plan,
)
from cellavie_hpc.data.sharding import shard, shard_all  # noqa: E402
from cellavie_hpc.data.synthetic import generate_dataset  # noqa: E402
from cellavie_hpc.errors import ConfigError  # noqa: E402
from cellavie_hpc.models.registry import MODELS, model_spec  # noqa: E402
from cellavie_hpc.models.targets import STAGES, detector_targets  # noqa: E402

P = 32


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "ds"
    generate_dataset(root, 2, (150, 130), parasitemia=0.3, seed=1, angles=2, workers=1, progress=False)
    return open_dataset(root)


def _expected(ds, image, y, x, p=P):
    """Reference window: the whole image read through the data-set API, reflect-padded by NumPy."""
    info = ds.images[image]
    field = ds.read_field(image)
    truth = ds.read_truth_patch(image, 0, 0, info.height, info.width)
    pad = ((max(0, -y), max(0, y + p - info.height)), (max(0, -x), max(0, x + p - info.width)))
    y0, x0 = y + pad[0][0], x + pad[1][0]

    def cut(a):
        padded = np.pad(a, ((0, 0),) * (a.ndim - 2) + pad, mode="reflect")
        return padded[..., y0:y0 + p, x0:x0 + p]

    return cut(field), {k: cut(v) for k, v in truth.items()}


def _all(data):
    xs, ys = zip(*[(x.numpy(), y) for x, y in data])
    assert all(isinstance(y, dict) for y in ys), "targets must be the spec's dict"
    return np.concatenate(xs), {k: np.concatenate([y[k].numpy() for y in ys]) for k in ys[0]}


@pytest.mark.parametrize("cache", [False, True])
def test_refocus_yields_exact_pixels_with_reflect_border(ds, cache):
    clear_image_cache()
    plan = task_plan(ds, "refocus", P, stride=P, border="reflect")
    tiles = shard(plan, 2, 1, epoch=1, seed=4).tiles
    head = model_spec("refocus", "tiny", P, 4, defocus_head=True)
    x, y = _all(build_pipeline(ds, tiles, "refocus", 4, P, spec=head, cache=cache, drop_remainder=False))
    assert x.shape == (len(tiles), P, P, 4) and x.dtype == np.float32
    assert set(y) == {"phase", "defocus_um"} and y["phase"].shape == (len(tiles), P, P, 1)
    assert y["phase"].dtype == y["defocus_um"].dtype == np.float32
    focus_um = [ds.images[image].focus_distance_m * 1e6 for image in tiles[:, 0]]
    np.testing.assert_allclose(y["defocus_um"][:, 0], focus_um, rtol=1e-6)
    assert len(np.unique(y["defocus_um"])) == 2, "both images' focus distances must appear"
    border = 0
    for n, (image, ty, tx) in enumerate(tiles.tolist()):
        field, truth = _expected(ds, image, ty, tx)
        border += ty + P > ds.images[image].height or tx + P > ds.images[image].width
        for a in range(2):
            np.testing.assert_array_equal(x[n, :, :, 2 * a], field[a].real)
            np.testing.assert_array_equal(x[n, :, :, 2 * a + 1], field[a].imag)
        np.testing.assert_array_equal(y["phase"][n, :, :, 0], truth["phase"])
        if ty + P <= ds.images[image].height and tx + P <= ds.images[image].width:
            np.testing.assert_array_equal(field, ds.read_field_patch(image, ty, tx, P, P))
    assert border > 0, "the shard must include border tiles for this test to mean anything"


def test_unet_targets_interior_and_boundary(ds):
    tiles = task_plan(ds, "unet", P).tiles[:6]
    x, targets = _all(build_pipeline(ds, tiles, "unet", 3, P))
    y = targets["classes"]
    assert set(targets) == {"classes"} and x.shape == (6, P, P, 1) and y.shape == (6, P, P) and y.dtype == np.int32
    for n, (image, ty, tx) in enumerate(tiles.tolist()):
        truth = ds.read_truth_patch(image, ty, tx, P, P)
        inst = truth["instance"]
        np.testing.assert_array_equal(x[n, ..., 0], truth["phase"])
        padded = np.pad(inst, 1, mode="edge")  # the patch edge itself is not a boundary
        differs = np.zeros_like(inst, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                differs |= padded[1 + dy:1 + dy + P, 1 + dx:1 + dx + P] != inst
        expected = np.where(inst > 0, np.where(differs, 2, 1), 0)
        np.testing.assert_array_equal(y[n], expected)
    assert set(np.unique(y)) == {0, 1, 2}


def test_detector_targets_match_models_contract(ds):
    tiles = task_plan(ds, "detector", P).tiles[:4]
    x, y = _all(build_pipeline(ds, tiles, "detector", 2, P))
    assert set(y) == {"heatmap", "size", "offset", "mask"} and y["heatmap"].shape == (4, 8, 8, 2)
    for n, (image, ty, tx) in enumerate(tiles.tolist()):
        truth = ds.read_truth_patch(image, ty, tx, P, P)
        want = detector_targets(truth["instance"], truth["cls"], 4)
        for key in want:
            np.testing.assert_allclose(y[key][n], want[key].numpy(), rtol=0, atol=0)


def test_classifier_crops_centred_on_listed_cells(ds):
    crop = 24
    plan = task_plan(ds, "classifier", crop)
    cells = [(i, c) for i, info in enumerate(ds.images) for c in ds.cells(i)
             if 0 <= np.rint(c["cy"]) < info.height and 0 <= np.rint(c["cx"]) < info.width]
    assert len(plan) == len(cells) < sum(len(ds.cells(i)) for i in range(2))  # cells centred outside are left out
    x, targets = _all(build_pipeline(ds, plan.tiles, "classifier", 5, crop, drop_remainder=False))
    y = targets["label"]
    assert set(targets) == {"label"} and x.shape == (len(cells), crop, crop, 1) and y.dtype == np.int32
    for n, (image, cell) in enumerate(cells):
        cy, cx = int(np.rint(cell["cy"])), int(np.rint(cell["cx"]))
        phase = ds.read_truth_patch(image, cy, cx, 1, 1)["phase"][0, 0]
        assert x[n, crop // 2, crop // 2, 0] == phase
        assert y[n] == STAGES.index(cell["stage"])
        np.testing.assert_array_equal(x[n, ..., 0], _expected(ds, image, cy - crop // 2, cx - crop // 2, crop)[1]["phase"])
    assert (y > 0).any() and (y == 0).any()


def test_classifier_balanced_sampling_keeps_count_and_halves_healthy_and_infected(ds):
    """Healthy and infected crops get half each, stages keep their shares among the infected (equal stage shares
    repeated the rarest stage's few crops so often that the classifier overfit them)."""
    labels = np.array([0] * 970 + [1] * 20 + [2] * 8 + [3] * 2, dtype=np.int32)
    tiles = np.arange(3000, dtype=np.int64).reshape(1000, 3)
    pick = _balanced_indices(labels, 1, 0, tiles)
    assert len(pick) == 1000 and np.array_equal(pick, _balanced_indices(labels, 1, 0, tiles))
    shares = np.bincount(labels[pick], minlength=4) / 1000
    np.testing.assert_allclose(shares, [0.5, 0.5 * 20 / 30, 0.5 * 8 / 30, 0.5 * 2 / 30], atol=0.04)
    only_healthy = _balanced_indices(np.zeros(50, np.int32), 1, 0, tiles[:50])
    assert len(only_healthy) == 50 and len(np.unique(only_healthy)) > 25  # one group present: uniform draw
    plan = task_plan(ds, "classifier", 16)
    _, y = _all(build_pipeline(ds, plan.tiles, "classifier", 1, 16, balanced=True, seed=1))
    labels = cell_labels(ds, plan.tiles, 16)
    assert len(y["label"]) == len(plan) and (labels > 0).any() and (labels == 0).any()
    np.testing.assert_array_equal(y["label"], labels[_balanced_indices(labels, 1, 0, plan.tiles)])


def test_classifier_rejects_tiles_that_are_not_cell_crops(ds):
    with pytest.raises(ConfigError, match="not a crop centred on a listed cell"):
        build_pipeline(ds, np.array([[0, 3, 3]]), "classifier", 1, 16)


def _transforms(a):
    """The 8 flips/rotations of a (P, P, ...) array, as the pipeline applies them (rot90 k, then flip)."""
    return [np.flip(np.rot90(a, k), axis=1) if f else np.rot90(a, k) for k in range(4) for f in (0, 1)]


@pytest.mark.parametrize("task", ["refocus", "unet"])
def test_augmentation_moves_inputs_and_targets_together(ds, task):
    tiles = task_plan(ds, task, P).tiles[:8]
    plain_x, plain_y = _all(build_pipeline(ds, tiles, task, 4, P))
    aug_x, aug_y = _all(build_pipeline(ds, tiles, task, 4, P, augment=True, seed=9, epoch=2))
    used = set()
    key = "phase" if task == "refocus" else "classes"
    for n in range(len(tiles)):
        matches = [t for t, cand in enumerate(_transforms(plain_x[n])) if np.array_equal(cand, aug_x[n])]
        assert matches, f"sample {n}: augmented input is not a flip/rotation of the tile"
        assert any(np.array_equal(_transforms(plain_y[key][n])[t], aug_y[key][n]) for t in matches)
        used.add(matches[0])

    assert len(used) > 1, "augmentation must actually vary between samples"


def test_deterministic_for_seed_and_epoch(ds):
    tiles = task_plan(ds, "unet", P).tiles
    kwargs = dict(augment=True, shuffle_buffer=8, drop_remainder=False)
    a = _all(build_pipeline(ds, tiles, "unet", 4, P, seed=1, epoch=3, **kwargs))
    b = _all(build_pipeline(ds, tiles, "unet", 4, P, seed=1, epoch=3, **kwargs))
    c = _all(build_pipeline(ds, tiles, "unet", 4, P, seed=1, epoch=4, **kwargs))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1]["classes"], b[1]["classes"])
    assert not np.array_equal(a[0], c[0])


def test_read_batch_and_dtype_do_not_change_pixels(ds):
    tiles = task_plan(ds, "refocus", P).tiles[:5]
    one = _all(build_pipeline(ds, tiles, "refocus", 5, P, read_batch=1))
    many = _all(build_pipeline(ds, tiles, "refocus", 5, P, read_batch=3))
    half = _all(build_pipeline(ds, tiles, "refocus", 5, P, dtype="bfloat16"))
    np.testing.assert_array_equal(one[0], many[0])
    assert half[0].dtype == tf.bfloat16.as_numpy_dtype and half[1]["phase"].dtype == np.float32
    np.testing.assert_allclose(half[0].astype(np.float32), one[0], rtol=1e-2, atol=1e-2)


def test_batches_and_steps(ds):
    tiles = task_plan(ds, "unet", P).tiles[:10]
    assert [x.shape[0] for x, _ in build_pipeline(ds, tiles, "unet", 4, P)] == [4, 4]
    assert [x.shape[0] for x, _ in build_pipeline(ds, tiles, "unet", 4, P, drop_remainder=False)] == [4, 4, 2]


@pytest.mark.parametrize("task", list(MODELS))
def test_targets_are_the_spec_dict_for_every_model(ds, task):
    """Regression: the pipeline once yielded bare tensors and no defocus target, so the refocus head was off."""
    patch = 16 if task == "classifier" else P
    options = {"defocus_head": True} if task == "refocus" else {}
    spec = model_spec(task, "base", patch, 4 if task == "refocus" else 1, **options)
    tiles = task_plan(ds, task, patch).tiles[:3]
    x, y = next(iter(build_pipeline(ds, tiles, task, 3, patch, spec=spec)))
    assert tuple(x.shape) == (3, *spec.input_shape)
    assert {k: (tuple(v.shape[1:]), v.dtype.name) for k, v in y.items()} == {
        k: (tuple(shape), spec.targets.dtypes[k]) for k, shape in spec.targets.shapes.items()}
    loss = spec.loss(y, {k: tf.zeros_like(v, tf.float32) for k, v in y.items()} if task in ("refocus", "detector")
                     else {"logits": tf.zeros((3, *((patch, patch, 3) if task == "unet" else (4,))))})
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_spec_options_shape_the_targets(ds):
    _, y = next(iter(build_pipeline(ds, task_plan(ds, "refocus", P).tiles[:2], "refocus", 2, P)))
    assert set(y) == {"phase"}  # the default spec: no defocus head
    stages = model_spec("detector", "tiny", P, 1, num_classes=4)
    _, y = next(iter(build_pipeline(ds, task_plan(ds, "detector", P).tiles[:2], "detector", 2, P, spec=stages)))
    assert y["heatmap"].shape == (2, P // 4, P // 4, 4)
    with pytest.raises(ConfigError, match="does not fit task refocus with patch 32 and 4 channels"):
        build_pipeline(ds, np.array([[0, 0, 0]]), "refocus", 1, P, spec=model_spec("refocus", "tiny", P, 2))
    with pytest.raises(ConfigError, match="model spec unet"):
        build_pipeline(ds, np.array([[0, 0, 0]]), "detector", 1, P, spec=model_spec("unet", "tiny", P, 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "segment"}, "task must be one of refocus, unet, detector, classifier"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"shard_tiles": np.array([[5, 0, 0]])}, "shard names images outside 0..1"),
        ({"defocus_jitter_m": 5e-6}, "> 0 only for the refocus task"),
        ({"task": "refocus", "defocus_jitter_m": -1e-6}, "must be a finite distance >= 0"),
    ],
)
def test_bad_arguments(ds, kwargs, message):
    args = dict(shard_tiles=np.array([[0, 0, 0]]), task="unet", batch=1, patch=P) | kwargs
    with pytest.raises(ConfigError, match=message):
        build_pipeline(ds, **args)


def test_defocus_jitter_moves_field_and_focus_target_together(ds):
    """A jittered input propagated back by its shift is the original input, and the focus target moved
    by exactly that shift: the pair stays physically consistent."""
    from cellavie_hpc.optics.propagation import propagate

    head = model_spec("refocus", "tiny", P, 4, defocus_head=True)
    tiles = task_plan(ds, "refocus", P).tiles[:4]
    plain_x, plain_y = _all(build_pipeline(ds, tiles, "refocus", 4, P, spec=head))
    # 1 um on a 32-px (8 um) tile: small enough that little light leaves the tile through its edges.
    jitter_x, jitter_y = _all(build_pipeline(ds, tiles, "refocus", 4, P, spec=head, defocus_jitter_m=1e-6, seed=3))
    again_x, _ = _all(build_pipeline(ds, tiles, "refocus", 4, P, spec=head, defocus_jitter_m=1e-6, seed=3))
    np.testing.assert_array_equal(jitter_x, again_x)
    np.testing.assert_allclose(plain_y["phase"], jitter_y["phase"])
    shift_m = (plain_y["defocus_um"] - jitter_y["defocus_um"]).reshape(-1) * 1e-6
    assert np.all(np.abs(shift_m) <= 1e-6 + 1e-9) and np.ptp(shift_m) > 1e-8
    for k in range(len(tiles)):
        planes = jitter_x[k, ..., 0::2] + 1j * jitter_x[k, ..., 1::2]
        back = propagate(np.transpose(planes, (2, 0, 1)).astype(np.complex64), -float(shift_m[k]),
                         ds.wavelength_m, ds.pixel_size_m, ds.medium_index, pad="edge").numpy()
        original = np.transpose(plain_x[k, ..., 0::2] + 1j * plain_x[k, ..., 1::2], (2, 0, 1))
        core = (slice(None), slice(8, -8), slice(8, -8))  # away from the edge padding
        assert np.abs(back[core] - original[core]).mean() < 0.01 * np.abs(original).mean()
        assert np.abs(back[core] - original[core]).max() < 0.05 * np.abs(original).mean()


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 12), start=st.integers(-30, 30), length=st.integers(1, 40))
def test_reflect_indices_match_numpy_pad(size, start, length):
    axis = np.arange(size)
    before, after = max(0, -start), max(0, start + length - size)
    want = np.pad(axis, (before, after), mode="reflect")[start + before:start + before + length]
    np.testing.assert_array_equal(axis[reflect_indices(start, length, size)], want)


def test_cli_tiles_plan_rank_and_summary(ds, capsys):
    args = ["tiles", "plan", str(ds.root), "--patch", str(P), "--world-size", "3", "--epoch", "2", "--seed", "5"]
    assert cli_main(args + ["--rank", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = task_plan(ds, "unet", P)
    want = shard(plan, 3, 1, epoch=2, seed=5)
    assert [[t["index"], t["y"], t["x"]] for t in out["tiles"]] == want.tiles.tolist()
    assert out["tiles"][0]["image"] == ds.images[want.tiles[0, 0]].id
    assert cli_main(args + ["--locality", "--batch", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    shares = shard_all(plan, 3, epoch=2, seed=5, locality=True)
    assert [r["tiles"] for r in summary["ranks"]] == [len(s) for s in shares]
    assert [r["images"] for r in summary["ranks"]] == [s.images().size for s in shares]
    assert {r["steps_per_epoch"] for r in summary["ranks"]} == {len(shares[0]) // 2}
    assert cli_main(["tiles", "plan", str(ds.root), "--patch", "0"]) == 2
    assert "patch must be a positive integer" in capsys.readouterr().err
