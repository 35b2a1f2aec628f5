"""Per-sample summary: cells screened, infected found, parasitaemia with a binomial confidence interval (pure).

At clinical parasitaemias (1e-3 to 1e-5) a sample yields a handful of infected cells or none, where the
normal-approximation interval is useless (it collapses to zero width at 0 positives). Clopper-Pearson
(exact, conservative) is the default; Wilson (score interval, closer to nominal coverage) is offered.
"""
from __future__ import annotations

import math
from statistics import NormalDist

METHODS = ("clopper-pearson", "wilson")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (n >= 1)."""
    _check(k, n, confidence)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half) if k else 0.0, min(1.0, centre + half) if k < n else 1.0


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion k/n from Beta quantiles (n >= 1)."""
    from scipy.stats import beta

    _check(k, n, confidence)
    alpha = 1 - confidence
    lower = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def proportion_interval(k: int, n: int, confidence: float = 0.95, method: str = "clopper-pearson"):
    if method == "wilson":
        return wilson_interval(k, n, confidence)
    if method == "clopper-pearson":
        return clopper_pearson_interval(k, n, confidence)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check(k: int, n: int, confidence: float) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def sample_summary(sample: str, images: int, cells: int, infected: int, stages: dict[str, int],
                   confidence: float = 0.95, method: str = "clopper-pearson") -> dict:
    """The summary JSON of one sample: counts and parasitaemia = infected / cells with its interval.

    With no cell screened the parasitaemia and its interval are None (nothing was measured).
    """
    if cells:
        lo, hi = proportion_interval(infected, cells, confidence, method)
        estimate = infected / cells
    else:
        lo = hi = estimate = None
    return {
        "sample": sample, "images": int(images), "cells_screened": int(cells), "infected_found": int(infected),
        "stages": {k: int(v) for k, v in stages.items()},
        "parasitaemia": estimate,
        "parasitaemia_ci": {"low": lo, "high": hi, "confidence": confidence, "method": method},
        "parasitaemia_per_million": None if estimate is None else estimate * 1e6,
    }
