#!/usr/bin/env bash
# Build (or reuse a cached build of) Horovod for the project's venv and install it.
#
# Horovod is compiled against the TensorFlow that is *installed* in the venv
# (it links libtensorflow_framework and uses its C++ ABI), so the wheel is
# cached outside the repository under a key made of
#   horovod version + TensorFlow version + CPython tag (+ cpu/gpu flavour)
# and a second run only re-installs the cached wheel (seconds, not minutes).
#
# Usage: tools/build_horovod.sh            # build if needed, install, verify
#        tools/build_horovod.sh --check    # exit 0 iff the venv already has this exact build
#        FORCE_REBUILD=1 tools/build_horovod.sh
#
# Environment:
#   PYTHON                 python of the target venv (default: <repo>/.venv/bin/python)
#   CELLAVIE_WHEEL_CACHE   wheel cache root (default: ~/.cache/cellavie-hpc/wheels)
#   MAKEFLAGS              passed to make (default: -j<nproc>, at most 8)
#   HOROVOD_GPU_OPERATIONS e.g. NCCL for a GPU cluster build (see docs/install.rst)
set -euo pipefail

# --------------------------------------------------------------------------
# Pins. These are the only pins for Horovod in the project.
# --------------------------------------------------------------------------
# Horovod 0.28.1 is the last release (2023-06); nothing newer exists on PyPI.
HOROVOD_VERSION="0.28.1"
# TensorFlow itself is pinned in setup.cfg (tensorflow-cpu==2.21.0 on Linux
# x86_64, keras>=3.10). This is the version the include-guard patch below was
# verified against; another TF version only produces a warning, and gets its
# own cache entry because the cache key uses the TF that is actually installed.
HOROVOD_TF_TESTED_VERSION="2.21.0"
# Frameworks: TensorFlow only, both controllers (MPI for mpirun/srun on the
# cluster, Gloo for `horovodrun --gloo` without MPI).
export HOROVOD_WITH_TENSORFLOW=1
export HOROVOD_WITH_GLOO=1
export HOROVOD_WITH_MPI=1
export HOROVOD_WITHOUT_PYTORCH=1
export HOROVOD_WITHOUT_MXNET=1

MODE="${1:-install}"
case "$MODE" in install|--check) ;; *) echo "usage: $0 [--check]" >&2; exit 2 ;; esac

log() { printf '[build_horovod %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf '[build_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || die "python not found: $PYTHON (run tools/install.sh first)"

# Default parallelism: number of cores, capped at 8 (compiling against the TF
# headers is memory hungry). Horovod's setup.py uses -j8 unless MAKEFLAGS is set.
NPROC="$(nproc 2>/dev/null || echo 2)"; [ "$NPROC" -gt 8 ] && NPROC=8
export MAKEFLAGS="${MAKEFLAGS:--j$NPROC}"
# CMake >= 4 refuses cmake_minimum_required(< 3.5), which Horovod's bundled
# gloo and flatbuffers still declare; older CMake ignores this variable.
export CMAKE_POLICY_VERSION_MINIMUM="${CMAKE_POLICY_VERSION_MINIMUM:-3.5}"

# Verification: horovod imports with TF ops, MPI and Gloo compiled in.
# Exit 0 when OK, 1 otherwise. Optional arg "init" also runs hvd.init() as a
# single process (MPI singleton), which proves the MPI library links/loads.
verify() {
  local errlog rc=0
  errlog="$(mktemp)"
  "$PYTHON" - "$HOROVOD_VERSION" "${1:-}" 2>"$errlog" <<'EOF' || rc=$?
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
want, mode = sys.argv[1], sys.argv[2]
try:
    import horovod
    import horovod.tensorflow as hvd
except Exception as exc:  # not installed, or built without TF
    print(f"horovod not usable: {type(exc).__name__}: {exc}")
    sys.exit(1)
ok = (horovod.__version__ == want and hvd.mpi_built() and hvd.gloo_built())
print(f"horovod {horovod.__version__}: mpi_built={hvd.mpi_built()} gloo_built={hvd.gloo_built()}")
if ok and mode == "init":
    hvd.init()
    print(f"hvd.init(): rank={hvd.rank()} size={hvd.size()} "
          f"mpi_enabled={hvd.mpi_enabled()} gloo_enabled={hvd.gloo_enabled()}")
    hvd.shutdown()
sys.exit(0 if ok else 1)
EOF
  # TensorFlow's import-time chatter goes to stderr; show it only on failure.
  [ "$rc" = 0 ] || grep -v -e oneDNN -e absl "$errlog" | tail -n 20 >&2
  rm -f "$errlog"
  return "$rc"
}

read -r TF_VERSION PY_TAG < <("$PYTHON" -c '
import sys, importlib.metadata as md
v = None
for dist in ("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tf-nightly"):
    try:
        v = md.version(dist); break
    except md.PackageNotFoundError:
        pass
print(v or "none", "cp%d%d" % sys.version_info[:2])')
[ "$TF_VERSION" != "none" ] || die "TensorFlow is not installed in $PYTHON's environment; run: pip install -e '.[test]'"
if [ "$TF_VERSION" != "$HOROVOD_TF_TESTED_VERSION" ]; then
  log "WARNING: TensorFlow $TF_VERSION installed; the build recipe was verified with $HOROVOD_TF_TESTED_VERSION"
fi

FLAVOUR="cpu"
[ -n "${HOROVOD_GPU_OPERATIONS:-}${HOROVOD_GPU_ALLREDUCE:-}" ] && FLAVOUR="gpu"
CACHE_ROOT="${CELLAVIE_WHEEL_CACHE:-$HOME/.cache/cellavie-hpc/wheels}"
CACHE_DIR="$CACHE_ROOT/horovod-$HOROVOD_VERSION-tf$TF_VERSION-$PY_TAG-$FLAVOUR"
# Marker in the venv root recording which cached build is installed, so that a
# TensorFlow upgrade (ABI change) triggers a rebuild even if the old build imports.
MARKER="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.cellavie-horovod-build"
BUILD_KEY="${CACHE_DIR##*/}"
if [ "$MODE" = --check ]; then
  [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$BUILD_KEY" ] || { log "no matching Horovod build installed (want $BUILD_KEY)"; exit 1; }
  verify >/dev/null || { log "installed Horovod does not import with TF + MPI + Gloo"; exit 1; }
  exit 0
fi

log "horovod $HOROVOD_VERSION for TensorFlow $TF_VERSION / $PY_TAG ($FLAVOUR); cache: $CACHE_DIR"

shopt -s nullglob
wheels=("$CACHE_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
if [ "${FORCE_REBUILD:-0}" = 1 ] || [ ${#wheels[@]} -eq 0 ]; then
  command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"
  command -v g++ >/dev/null || die "g++ not found (apt-get install g++)"
  command -v mpicxx >/dev/null || die "MPI compiler wrapper not found (apt-get install libopenmpi-dev openmpi-bin libpmix-dev)"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  log "downloading the horovod==$HOROVOD_VERSION sdist"
  "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "horovod==$HOROVOD_VERSION" -d "$WORK"
  tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
  SRC="$WORK/horovod-$HOROVOD_VERSION"

  # Patch: horovod/tensorflow/xla_mpi_ops.cc includes XLA headers which (with
  # TF >= 2.17 wheels) reach highwayhash/arch_specific.h, a header the TF wheel
  # does not ship. All code of that file is already inside `#if HAVE_GPU`, so
  # guarding its includes the same way is a no-op for GPU builds and lets a
  # CPU build compile. (A GPU build against such TF still fails: see docs/install.rst.)
  log "patching horovod/tensorflow/xla_mpi_ops.cc (XLA includes only for HAVE_GPU builds)"
  "$PYTHON" - "$SRC/horovod/tensorflow/xla_mpi_ops.cc" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
old = "#if TENSORFLOW_VERSION >= 2006000000\n"
new = "#if HAVE_GPU && TENSORFLOW_VERSION >= 2006000000  // cellavie-hpc: XLA headers only for GPU builds\n"
if new in src:
    sys.exit(0)
if src.count(old) != 1 or "#endif // TENSORFLOW_VERSION >= 2006000000" not in src:
    sys.exit(f"patch pattern not found exactly once in {path}; the sdist changed - update tools/build_horovod.sh")
open(path, "w").write(src.replace(old, new))
EOF

  log "building the wheel (MAKEFLAGS=$MAKEFLAGS; takes a few minutes; log: $WORK/build.log)"
  start=$SECONDS
  # --no-build-isolation: setup.py must import the venv's TensorFlow to find its
  # headers, libraries and compile flags.
  if ! "$PYTHON" -m pip wheel --no-deps --no-build-isolation -v "$SRC" -w "$WORK/dist" >"$WORK/build.log" 2>&1; then
    grep -nE 'error|Error' "$WORK/build.log" | tail -n 30 >&2 || true
    tail -n 40 "$WORK/build.log" >&2
    cp "$WORK/build.log" "${TMPDIR:-/tmp}/horovod-build-failed.log"
    die "horovod build failed; full log: ${TMPDIR:-/tmp}/horovod-build-failed.log"
  fi
  log "built in $((SECONDS - start)) s"
  grep -E 'Build architecture flags' "$WORK/build.log" | sort -u | sed 's/^ *--/ /' || true
  built=("$WORK"/dist/horovod-"$HOROVOD_VERSION"-*.whl)
  [ ${#built[@]} -eq 1 ] || die "expected one wheel in $WORK/dist, found ${#built[@]}"
  mkdir -p "$CACHE_DIR"
  rm -f "$CACHE_DIR"/*.whl
  # copy then rename, so a concurrent install never sees a half-written wheel
  cp "${built[0]}" "$CACHE_DIR/.${built[0]##*/}.part"
  mv "$CACHE_DIR/.${built[0]##*/}.part" "$CACHE_DIR/${built[0]##*/}"
  wheels=("$CACHE_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
else
  log "reusing cached wheel ${wheels[0]##*/}"
fi

log "installing ${wheels[0]##*/}"
rm -f "$MARKER"
"$PYTHON" -m pip install --quiet --force-reinstall --no-deps "${wheels[0]}"
# Horovod's own runtime deps are normally already there through setup.cfg.
if ! "$PYTHON" -c 'import cloudpickle, psutil, yaml, packaging' 2>/dev/null; then
  "$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging
fi

log "verifying"
if ! verify init; then
  die "installed horovod lacks TensorFlow/MPI/Gloo support; rebuild with FORCE_REBUILD=1 and check the log"
fi
echo "$BUILD_KEY" > "$MARKER"
log "done"
