"""Alpha-beta model of an allreduce, fitted to measured collective timings.

A message of n bytes all-reduced over p ranks costs, in the classic Hockney model,

    ring:  T = 2(p-1) * alpha + 2(p-1)/p * n * beta        (reduce-scatter then all-gather)
    tree:  T = 2 ceil(log2 p) * (alpha + n * beta)          (binomial reduce then broadcast)

alpha is the latency of one hop (s) and beta the inverse bandwidth (s/byte). The fit is robust (Huber
weights on relative residuals, since timings span orders of magnitude from 4 KB to the full gradient)
and non-negative; the uncertainty comes from a bootstrap over the measurements. The same formula is
the exchange term of the step-time model in `report.calibration`, which takes a `CommFit` to replace
its fitted exchange term by the measured one.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cellavie_hpc.errors import DataError, UserError
from cellavie_hpc.report.calibration import nnls_small
from cellavie_hpc.report.stats import bootstrap

ALGORITHMS = ("ring", "tree")
#: Huber's tuning constant (95% efficiency for Gaussian residuals), in units of the robust scale.
HUBER_K = 1.345
FITS_KIND = "cellavie-comm-fits"


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise UserError(f"allreduce algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def design(message_bytes: Any, world_size: Any, algorithm: str = "ring") -> np.ndarray:
    """Columns [latency hops, bytes crossing the slowest link] so that T = design @ [alpha, beta]."""
    _check_algorithm(algorithm)
    n, p = np.broadcast_arrays(np.asarray(message_bytes, np.float64), np.asarray(world_size, np.float64))
    if np.any(p < 1) or np.any(n < 0):
        raise UserError("allreduce model: world size must be >= 1 and message bytes >= 0")
    if algorithm == "ring":
        hops = 2 * (p - 1)
        volume = 2 * (p - 1) / p * n
    else:
        hops = 2 * np.ceil(np.log2(p))
        volume = hops * n
    return np.stack([hops, volume], axis=-1)


def allreduce_time_s(message_bytes: Any, world_size: Any, alpha_s: float, inv_bandwidth_s_per_byte: float,
                     algorithm: str = "ring") -> np.ndarray:
    """Modelled time (s) of one allreduce of `message_bytes` over `world_size` ranks (0 for one rank)."""
    return design(message_bytes, world_size, algorithm) @ np.array([alpha_s, inv_bandwidth_s_per_byte])


def _robust_fit(a: np.ndarray, t: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Non-negative [alpha, beta] minimising Huber's loss of the relative residuals (IRLS)."""
    scaled = a / t[:, None]
    w = np.ones_like(t)
    coef = np.zeros(a.shape[1])
    for _ in range(iterations):
        root = np.sqrt(w)
        new = nnls_small(scaled * root[:, None], root)
        r = scaled @ new - 1
        scale = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 1e-9)
        w = np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(r), 1e-300))
        if np.allclose(new, coef, rtol=1e-10, atol=0):
            break
        coef = new
    return new


@dataclass(frozen=True)
class CommFit:
    """Fitted latency and bandwidth of one engine/transport, with bootstrap uncertainty.

    `rms_rel_error` compares the model with the median time of each (message size, world size);
    `gradient_bytes` is the full fp32 gradient of `model` (the probe's largest message), if known.
    """

    engine: str
    algorithm: str
    alpha_s: float
    inv_bandwidth_s_per_byte: float
    alpha_std_s: float
    inv_bandwidth_std_s_per_byte: float
    bandwidth_p5_bytes_per_s: float
    bandwidth_p95_bytes_per_s: float
    points: int
    world_sizes: tuple[int, ...]
    rms_rel_error: float
    max_rel_error: float
    model: str | None = None
    gradient_bytes: float | None = None

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return 1.0 / self.inv_bandwidth_s_per_byte if self.inv_bandwidth_s_per_byte > 0 else math.inf

    def predict(self, message_bytes: Any, world_size: Any) -> np.ndarray:
        """Modelled allreduce time (s)."""
        return allreduce_time_s(message_bytes, world_size, self.alpha_s, self.inv_bandwidth_s_per_byte,
                                self.algorithm)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"world_sizes": list(self.world_sizes),
                               "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "comm fit") -> "CommFit":
        names = set(cls.__dataclass_fields__)
        missing = sorted(n for n in names - {"model", "gradient_bytes"} if n not in data)
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["world_sizes"] = tuple(int(x) for x in kwargs["world_sizes"])
        _check_algorithm(kwargs["algorithm"])
        return cls(**kwargs)


def fit_alpha_beta(message_bytes: Any, world_size: Any, time_s: Any, *, engine: str = "", algorithm: str = "ring",
                   repeats: int = 200, seed: int = 0, model: str | None = None,
                   gradient_bytes: float | None = None) -> CommFit:
    """Fit alpha (s) and beta (s/byte) to measured allreduce times (one row per timed call).

    Needs at least two distinct message sizes on a world size > 1 (otherwise alpha and beta are not
    separable). Repeated calls of one size are fine and make the bootstrap meaningful.
    """
    n = np.asarray(message_bytes, np.float64).ravel()
    p = np.asarray(world_size, np.float64).ravel()
    t = np.asarray(time_s, np.float64).ravel()
    n, p = np.broadcast_to(n, t.shape), np.broadcast_to(p, t.shape)
    ok = np.isfinite(t) & (t > 0) & (p > 1)
    if len(set(n[ok])) < 2:
        raise UserError(f"comm fit {engine or ''}: need positive times of at least two message sizes on more than "
                        f"one rank, got {int(ok.sum())} usable of {t.size} measurements")
    n, p, t = n[ok], p[ok], t[ok]
    a = design(n, p, algorithm)
    coef = _robust_fit(a, t)
    boot = bootstrap(len(t), lambda idx: _robust_fit(a[idx], t[idx]), repeats=repeats, seed=seed)
    keys = sorted(set(zip(n.tolist(), p.tolist())))
    medians = np.array([np.median(t[(n == kn) & (p == kp)]) for kn, kp in keys])
    kn, kp = np.array(keys).T
    rel = allreduce_time_s(kn, kp, *coef, algorithm) / medians - 1
    bw = 1.0 / boot[:, 1][boot[:, 1] > 0] if len(boot) else np.array([])
    return CommFit(
        engine=engine, algorithm=algorithm, alpha_s=float(coef[0]), inv_bandwidth_s_per_byte=float(coef[1]),
        alpha_std_s=float(boot[:, 0].std()) if len(boot) else math.nan,
        inv_bandwidth_std_s_per_byte=float(boot[:, 1].std()) if len(boot) else math.nan,
        bandwidth_p5_bytes_per_s=float(np.percentile(bw, 5)) if bw.size else math.nan,
        bandwidth_p95_bytes_per_s=float(np.percentile(bw, 95)) if bw.size else math.nan,
        points=int(t.size), world_sizes=tuple(sorted(int(x) for x in set(p))),
        rms_rel_error=float(np.sqrt(np.mean(rel ** 2))), max_rel_error=float(np.max(np.abs(rel))),
        model=model, gradient_bytes=gradient_bytes,
    )


def write_comm_fits(fits: Iterable[CommFit], path: str | Path, environment: dict[str, Any] | None = None) -> Path:
    """Write fits as JSON (the file `load_comm_fit` and the calibration read)."""
    path = Path(path)
    payload = {"kind": FITS_KIND, "model": "ring: T = 2(p-1)*alpha + 2(p-1)/p*n*beta; tree: T = 2ceil(log2 p)*(alpha+n*beta)",
               "environment": environment or {}, "fits": [f.to_dict() for f in fits]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def load_comm_fit(path: str | Path, engine: str | None = None) -> CommFit:
    """The fit of `engine` from a file of `write_comm_fits` (the only one if `engine` is None)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable comm fits file ({err}); write one with benchmarks/allreduce.py") from err
    if not isinstance(payload, dict) or payload.get("kind") != FITS_KIND:
        raise DataError(f"{path}: not a comm fits file (expected kind {FITS_KIND!r})")
    fits = [CommFit.from_dict(f, f"{path} fit {i}") for i, f in enumerate(payload.get("fits", []))]
    matches = [f for f in fits if engine is None or f.engine == engine]
    if len(matches) != 1:
        names = ", ".join(f.engine for f in fits) or "none"
        what = f"engine {engine!r}" if engine else "a single fit"
        raise UserError(f"{path}: expected {what}, found {len(matches)} (engines in the file: {names}); pick one")
    return matches[0]
