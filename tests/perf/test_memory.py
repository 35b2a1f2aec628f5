"""Largest-batch search: the doubling/bisection logic on a known predicate, and real trials in subprocesses."""
from __future__ import annotations

import pytest

from cellavie_hpc.perf.memory import Trial, TrialSpec, largest_batch, run_trial, search_table


def _recording(limit_ok: int):
    tried: list[int] = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= limit_ok

    return fits, tried


def test_doubles_then_bisects_to_the_exact_largest_batch():
    fits, tried = _recording(37)
    result = largest_batch(fits, start=1, limit=4096)
    assert result.largest == 37
    assert not result.limit_reached
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert [t.batch for t in result.trials] == tried  # each batch tried once, in order
    assert [t.fits for t in result.trials] == [b <= 37 for b in tried]


@pytest.mark.parametrize("largest", [1, 2, 3, 5, 63, 64, 65, 100, 127, 999])
def test_every_largest_batch_is_found_with_logarithmic_trials(largest):
    fits, tried = _recording(largest)
    result = largest_batch(fits, start=1, limit=1024)
    assert result.largest == largest
    assert len(tried) == len(set(tried)) <= 2 * largest.bit_length() + 1


def test_limit_stops_the_doubling_and_is_reported():
    fits, tried = _recording(10_000)
    result = largest_batch(fits, start=3, limit=100)
    assert (result.largest, result.limit_reached) == (100, True)
    assert tried == [3, 6, 12, 24, 48, 96, 100]


def test_nothing_fits_and_a_failing_start_bisects_below_it():
    fits, tried = _recording(0)
    assert largest_batch(fits).largest == 0 and tried == [1]
    fits, tried = _recording(5)
    result = largest_batch(fits, start=16, limit=64)
    assert result.largest == 5 and tried == [16, 8, 4, 6, 5]


def test_bad_search_bounds_are_rejected():
    with pytest.raises(ValueError, match="start <= limit"):
        largest_batch(lambda b: True, start=8, limit=4)


def test_table_rows_carry_each_trial_and_the_largest_batch():
    def fake_trial(spec: TrialSpec, batch: int) -> Trial:
        return Trial(batch, batch * spec.patch <= 640, peak_bytes=batch * 2**20)

    rows = search_table([TrialSpec(patch=32), TrialSpec(patch=64)], limit=64, progress=False, trial=fake_trial)
    largest = {(r["patch"], r["batch"]): r["largest_batch"] for r in rows}
    assert {r["largest_batch"] for r in rows if r["patch"] == 32} == {20}
    assert {r["largest_batch"] for r in rows if r["patch"] == 64} == {10}
    assert (32, 16) in largest and (32, 32) in largest and all(r["peak_bytes"] == r["batch"] * 2**20 for r in rows)


@pytest.mark.slow
def test_real_trials_fit_under_a_generous_budget_and_fail_over_a_tiny_one():
    spec = TrialSpec(model="unet", preset="tiny", patch=32, steps=1)
    ok = run_trial(spec, 2)
    assert ok.fits and ok.source == "rss"
    assert ok.peak_bytes > ok.baseline_bytes > 50 * 2**20  # the TF runtime alone is hundreds of MiB
    over = run_trial(TrialSpec(model="unet", preset="tiny", patch=32, steps=1, budget_bytes=2**20), 2)
    assert not over.fits and "budget" in over.reason and over.peak_bytes > 2**20


def test_a_trial_that_fails_for_another_reason_is_an_error_not_a_full_device():
    with pytest.raises(RuntimeError, match="not an out-of-memory"):
        run_trial(TrialSpec(model="unet", preset="tiny", patch=30, steps=1), 2)
