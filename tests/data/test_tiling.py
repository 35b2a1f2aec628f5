"""Tile plans: exact positions, coverage of the image, validation."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellavie_hpc.data.tiling import plan_tiles
from cellavie_hpc.errors import ConfigError

sizes = st.lists(st.tuples(st.integers(1, 90), st.integers(1, 90)), min_size=1, max_size=5)


def test_drop_grid_positions_exact():
    plan = plan_tiles([(10, 7), (4, 4)], patch=4, stride=3)
    assert plan.tiles.tolist() == [
        [0, 0, 0], [0, 0, 3], [0, 3, 0], [0, 3, 3], [0, 6, 0], [0, 6, 3],
        [1, 0, 0],
    ]
    assert plan.tiles.dtype == np.int64
    assert plan.tiles_per_image().tolist() == [6, 1]


def test_reflect_covers_border_and_counts_in_bounds_pixels():
    plan = plan_tiles([(10, 7)], patch=4, border="reflect")
    assert sorted(set(plan.tiles[:, 1].tolist())) == [0, 4, 8]
    assert sorted(set(plan.tiles[:, 2].tolist())) == [0, 4]
    # Rows 8..11 of a 10-row image: 2 rows inside; columns 4..7 of 7: 3 columns inside.
    last = {(y, x): p for (_, y, x), p in zip(plan.tiles.tolist(), plan.in_bounds_pixels().tolist())}
    assert last[(8, 4)] == 2 * 3 and last[(0, 0)] == 16


def test_image_smaller_than_patch():
    assert len(plan_tiles([(3, 3)], patch=4)) == 0
    assert plan_tiles([(3, 3)], patch=4, border="reflect").tiles.tolist() == [[0, 0, 0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch": 0}, "patch must be a positive integer"),
        ({"patch": 4, "stride": -1}, "stride must be a positive integer"),
        ({"patch": 4, "border": "wrap"}, "border must be one of drop, reflect"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_tiles([(8, 8)], **kwargs)


def test_bad_image_size_names_the_image():
    with pytest.raises(ConfigError, match="image 1: size must be positive"):
        plan_tiles([(8, 8), (0, 8)], patch=4)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, patch=st.integers(1, 40), stride=st.integers(1, 40))
def test_drop_tiles_inside_and_on_grid(sizes, patch, stride):
    plan = plan_tiles(sizes, patch, stride)
    hw = np.asarray(sizes)[plan.images]
    assert np.all(plan.tiles[:, 1:] % stride == 0)
    assert np.all(plan.tiles[:, 1:] + patch <= hw)
    # No missing grid position: the next one along each axis would leave the image.
    for i, (h, w) in enumerate(sizes):
        expected = len(range(0, h - patch + 1, stride)) * len(range(0, w - patch + 1, stride))
        assert plan.tiles_per_image()[i] == expected
    assert np.array_equal(plan.in_bounds_pixels(), np.full(len(plan), patch * patch))


@settings(max_examples=60, deadline=None)
@given(sizes=sizes, patch=st.integers(1, 40), stride_frac=st.floats(0.2, 1.0))
def test_reflect_covers_every_pixel(sizes, patch, stride_frac):
    stride = max(1, int(patch * stride_frac))
    plan = plan_tiles(sizes, patch, stride, border="reflect")
    for i, (h, w) in enumerate(sizes):
        covered = np.zeros((h + patch, w + patch), bool)
        for _, y, x in plan.tiles[plan.images == i]:
            covered[y:y + patch, x:x + patch] = True
        assert covered[:h, :w].all()
        mine = plan.tiles[plan.images == i]
        # Every tile starts inside the image, and only the last row/column reaches past it.
        assert np.all(mine[:, 1] < h) and np.all(mine[:, 2] < w)
        assert np.all((mine[:, 1] + patch <= h) | (mine[:, 1] == mine[:, 1].max()))
