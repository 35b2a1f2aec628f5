#!/usr/bin/env bash
# `make install`: create/update the project venv (.venv), install the package
# with its test extras (dependencies and pins live in setup.cfg only), then
# build/install Horovod via tools/build_horovod.sh (pins for Horovod live there).
#
# Idempotent and fast on re-runs: each step is skipped when already satisfied
# (second run: ~5 s on an idle machine, dominated by importing TensorFlow for the
# Horovod check).
#
# Environment:
#   PYTHON_BIN               interpreter for a new venv (default: python3.11)
#   VENV                     venv location (default: <repo>/.venv)
#   CELLAVIE_SKIP_HOROVOD=1  do not build/install Horovod
#   CELLAVIE_SKIP_APT=1      never call apt-get
#   FORCE_REINSTALL=1        re-run `pip install -e .[test]` even if setup.cfg is unchanged
#   CELLAVIE_WHEEL_CACHE     where built Horovod wheels are cached (see build_horovod.sh)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
T0=$SECONDS

log() { printf '[install %(%H:%M:%S)T +%3ss] %s\n' -1 "$((SECONDS - T0))" "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. system packages
# Needed to compile Horovod with MPI + Gloo: MPI headers/wrappers + launcher,
# PMIx (Open MPI 4 on Debian 12 links it), cmake >= 3.13, a C++17 compiler.
SYSTEM_PACKAGES=(libopenmpi-dev openmpi-bin libpmix-dev cmake g++)
if [ "${CELLAVIE_SKIP_HOROVOD:-0}" != 1 ] && [ "${CELLAVIE_SKIP_APT:-0}" != 1 ] && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      log "apt-get install ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      log "WARNING: missing system packages: ${missing[*]} (not root; ask an admin or run: sudo apt-get install ${missing[*]}). The Horovod build will fail without them."
    fi
  else
    log "system packages present: ${SYSTEM_PACKAGES[*]}"
  fi
fi

# ---------------------------------------------------------------- 2. venv
if [ ! -x "$PY" ]; then
  command -v "$PYTHON_BIN" >/dev/null || die "$PYTHON_BIN not found; install Python 3.11 or set PYTHON_BIN"
  if ! "$PYTHON_BIN" -c 'import ensurepip' 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      && [ "${CELLAVIE_SKIP_APT:-0}" != 1 ]; then
    log "apt-get install python3.11-venv (ensurepip missing)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv >/dev/null
  fi
  log "creating venv $VENV with $("$PYTHON_BIN" -V 2>&1)"
  "$PYTHON_BIN" -m venv "$VENV"
else
  log "using existing venv $VENV"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$VENV is $("$PY" -V 2>&1), need 3.11: rm -rf $VENV and re-run"

# Editable installs of a setup.cfg project need pip >= 21.3 and setuptools >= 64.
if ! "$PY" - <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
def v(name):
    try:
        return tuple(int(x) for x in version(name).split(".")[:2] if x.isdigit())
    except PackageNotFoundError:
        return (0,)
ok = v("pip") >= (23, 1) and v("setuptools") >= (68, 0) and v("wheel") >= (0, 40)
sys.exit(0 if ok else 1)
EOF
then
  log "upgrading pip/setuptools/wheel"
  "$PY" -m pip install --quiet --upgrade pip setuptools wheel
fi

# ---------------------------------------------------------------- 3. the package
# Skip when setup.cfg/pyproject.toml/setup.py are unchanged since the last
# successful install into this venv and the distribution is still installed.
STAMP="$VENV/.cellavie-install-stamp"
want_stamp="$( { cat setup.cfg pyproject.toml setup.py 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)"
if [ "${FORCE_REINSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
    && "$PY" -c 'import cellavie_hpc' 2>/dev/null; then
  log "package already installed (setup.cfg unchanged); FORCE_REINSTALL=1 to redo"
else
  # Extras: "test", plus "cpu" if setup.cfg defines it (TensorFlow split into
  # cpu/gpu extras so that GPU clusters can use environment.yml); override with
  # CELLAVIE_PIP_EXTRAS.
  extras="${CELLAVIE_PIP_EXTRAS:-$("$PY" - <<'EOF'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
extras = cfg["options.extras_require"] if cfg.has_section("options.extras_require") else {}
print(",".join(["test"] + (["cpu"] if "cpu" in extras else [])))
EOF
)}"
  log "pip install -e '.[$extras]'"
  "$PY" -m pip install --progress-bar off -e ".[$extras]"
  echo "$want_stamp" > "$STAMP"
fi

# ---------------------------------------------------------------- 4. Horovod
if [ "${CELLAVIE_SKIP_HOROVOD:-0}" = 1 ]; then
  log "CELLAVIE_SKIP_HOROVOD=1: not installing Horovod"
elif [ "$(uname -s)" != Linux ]; then
  log "WARNING: Horovod is only built on Linux here; skipping (Horovod tests will be skipped)"
elif PYTHON="$PY" bash "$REPO/tools/build_horovod.sh" --check; then
  log "Horovod already installed with TensorFlow + MPI + Gloo; skipping build"
else
  log "building/installing Horovod (tools/build_horovod.sh)"
  PYTHON="$PY" bash "$REPO/tools/build_horovod.sh"
fi

log "install complete in $((SECONDS - T0)) s (activate: source ${VENV#"$REPO"/}/bin/activate)"
