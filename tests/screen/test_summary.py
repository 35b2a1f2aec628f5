"""Parasitaemia intervals: known values, edge cases, and that the interval always holds the estimate."""
import math

import pytest
from hypothesis import given, strategies as st

from cellavie_hpc.screen.summary import clopper_pearson_interval, sample_summary, wilson_interval


def test_zero_positives_rule_of_three():
    lo, hi = clopper_pearson_interval(0, 100_000)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / 100_000), rel=1e-9)   # exact one-sided 97.5 % bound
    assert hi == pytest.approx(3.689e-5, rel=1e-3)


def test_wilson_known_value():
    lo, hi = wilson_interval(5, 10_000)
    assert lo == pytest.approx(2.136e-4, rel=1e-3)
    assert hi == pytest.approx(1.170e-3, rel=1e-3)


@given(n=st.integers(1, 10**7), frac=st.floats(0, 1), confidence=st.sampled_from([0.9, 0.95, 0.99]))
def test_intervals_contain_the_estimate(n, frac, confidence):
    k = min(n, int(frac * n))
    for lo, hi in (clopper_pearson_interval(k, n, confidence), wilson_interval(k, n, confidence)):
        assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_exact_interval_is_more_conservative_than_wilson_at_few_positives():
    cp, w = clopper_pearson_interval(3, 50_000), wilson_interval(3, 50_000)
    assert cp[0] == pytest.approx(1.2374e-5, rel=1e-3) and cp[1] == pytest.approx(1.7534e-4, rel=1e-3)
    assert cp[0] < w[0] and cp[1] - cp[0] > w[1] - w[0]


def test_summary_counts_and_no_cells():
    s = sample_summary("s1", 4, 20_000, 20, {"ring": 12, "trophozoite": 6, "schizont": 2})
    assert s["parasitaemia"] == 1e-3 and s["parasitaemia_per_million"] == pytest.approx(1000.0)
    assert s["parasitaemia_ci"]["low"] < 1e-3 < s["parasitaemia_ci"]["high"]
    empty = sample_summary("s2", 1, 0, 0, {})
    assert empty["parasitaemia"] is None and empty["parasitaemia_ci"]["low"] is None
    with pytest.raises(ValueError):
        clopper_pearson_interval(3, 2)
    assert math.isclose(sample_summary("s3", 1, 10, 0, {}, method="wilson")["parasitaemia_ci"]["low"], 0.0)
