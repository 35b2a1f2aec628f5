"""Skip-or-fail checks for optional engines (Horovod, MPI launcher).

Plain functions so that ``tests/conftest.py`` can wrap them in fixtures::

    from _requirements import require_horovod      # tests/ on sys.path (pytest default)

    @pytest.fixture
    def horovod_available():
        return require_horovod()

Without the engine a test is *skipped* with a visible reason; with
``CELLAVIE_REQUIRE_HOROVOD=1`` (set by ``.ci/run``) it *fails* instead, so CI
cannot go green by silently skipping the distributed tests.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REQUIRE_ENV = "CELLAVIE_REQUIRE_HOROVOD"

_CHECK = r"""
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import horovod, horovod.tensorflow as hvd
missing = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if not ok]
if missing:
    sys.exit("horovod %s built without %s" % (horovod.__version__, "+".join(missing)))
print(horovod.__version__)
"""


class HorovodInfo(NamedTuple):
    version: str
    horovodrun: str  # path of the horovodrun launcher of this interpreter's environment


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def _skip_or_fail(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _horovod_status() -> tuple[str | None, str]:
    """(version, "") if horovod.tensorflow imports with MPI and Gloo, else (None, reason).

    Checked in a subprocess (once per session) so the test process does not
    load TensorFlow/MPI just to decide whether to skip.
    """
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return None, "importing horovod.tensorflow timed out after 120 s"
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if "oneDNN" not in ln and "absl" not in ln]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        return None, f"horovod.tensorflow not usable: {detail} (build it with `make install` / tools/build_horovod.sh)"
    return proc.stdout.strip(), ""


def require_horovod() -> HorovodInfo:
    """Return Horovod info, or skip (fail under CELLAVIE_REQUIRE_HOROVOD=1)."""
    version, reason = _horovod_status()
    if version is None:
        _skip_or_fail(reason)
    launcher = Path(sys.executable).with_name("horovodrun")
    horovodrun = str(launcher) if launcher.exists() else shutil.which("horovodrun")
    if not horovodrun:
        _skip_or_fail("horovod imports but the `horovodrun` launcher is not installed")
    return HorovodInfo(version=version, horovodrun=horovodrun)


def require_mpirun() -> str:
    """Return the path of ``mpirun``, or skip (fail under CELLAVIE_REQUIRE_HOROVOD=1)."""
    mpirun = shutil.which("mpirun")
    if not mpirun:
        _skip_or_fail("mpirun not found (apt-get install openmpi-bin)")
    return mpirun
