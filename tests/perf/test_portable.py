"""The Keras-only bench: trains the project's models on the installed back-end and measures FLOP/s."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from cellavie_hpc.perf import portable

PACKAGE = Path(__file__).resolve().parents[2] / "cellavie_hpc"
#: The one models module that is TensorFlow by design (targets run inside tf.data); registry imports it lazily.
TF_BY_DESIGN = {"models/targets.py"}


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_models_and_portable_bench_import_without_tensorflow():
    files = sorted((PACKAGE / "models").glob("*.py")) + [PACKAGE / "perf" / "portable.py"]
    offenders = [str(f.relative_to(PACKAGE)) for f in files
                 if "tensorflow" in _module_level_imports(f) and str(f.relative_to(PACKAGE)) not in TF_BY_DESIGN]
    assert offenders == [], f"these modules import TensorFlow at import time: {offenders}"


def test_training_on_the_tensorflow_backend_reports_positive_flops():
    peak = portable.matmul_peak_flops("float32", n=256, repeats=2, chain=2)
    r = portable.measure("unet", "tiny", patch=32, batch=2, precision="fp32", jit=True, steps=3, warmup=1,
                         peak_flops_per_s=peak)
    assert r.backend == "tensorflow" and r.steps == 3
    assert r.samples_per_s == pytest.approx(2 / r.step_time_median_s)
    assert r.train_flops_per_sample > 0 and r.achieved_flops_per_s == pytest.approx(
        r.train_flops_per_sample * r.samples_per_s)
    assert peak > 1e8 and 0 < r.mfu < 1.5  # a tiny U-Net cannot beat the matmul peak by much
    assert r.mem_peak_bytes > 2**20 and r.mem_source == "rss"
    assert r.step_time_p10_s <= r.step_time_median_s <= r.step_time_p90_s


def test_precision_sets_the_policy_and_rejects_unknown_names():
    import keras

    portable.set_precision("mixed_bfloat16")
    assert keras.config.dtype_policy().compute_dtype == "bfloat16"
    portable.set_precision("fp32")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="precision"):
        portable.set_precision("fp8")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed in this environment")
def test_the_jax_backend_runs_the_same_bench(tmp_path):
    import subprocess
    import sys

    code = ("from cellavie_hpc.perf import portable; r = portable.measure('unet', 'tiny', 32, 2, steps=2, warmup=1);"
            "import sys; assert 'tensorflow' not in sys.modules; print(r.backend, r.achieved_flops_per_s > 0)")
    out = subprocess.run([sys.executable, "-c", code], env={"KERAS_BACKEND": "jax", "PATH": ""}, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.split() == ["jax", "True"], out.stderr[-2000:]
