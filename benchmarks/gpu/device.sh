#!/usr/bin/env bash
# The one command a session with a lent GPU runs (benchmarks/gpu/README.md): it sets up
# what .gpu/ carried (benchmarks/gpu/pack.py made it), runs the GPU test tier, then the
# GPU benchmark. Everything it writes goes to $OUT: setup.log, pytest-gpu.log, gpu.json,
# gpu.md and the two tritonserver logs. About 5 minutes, at most 8 (setup ~30 s, tests at
# most 90 s, the benchmark's own budget 300 s, stopped at 360 s): a run and a rerun fit a
# session's 15 device minutes with the machine's start.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/dynemb-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DYNEMB_MINILM_DIR=$ROOT/.gpu/minilm DYNEMB_CACHE=/tmp/dynemb-cache
SITE=/tmp/dynemb-site NUMPY=/tmp/dynemb-numpy

setup() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 --version && command -v python3
  [ -f .gpu/site.tar.xz ] || { echo "no .gpu/: run benchmarks/gpu/pack.py and carry .gpu"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$NUMPY" .gpu/numpy-*.whl || return 1
  python3 -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('$SITE')" || return 1
  # One .pth in python3's own site-packages: the tritonserver stub's embedded Python reads
  # it too (it ignores PYTHONPATH). numpy < 2 first: the stub's pybind11 predates NumPy 2.
  PURE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "import sys; sys.path[:0] = ['$NUMPY']" "$ROOT/src" "$ROOT/client" "$SITE" \
    > "$PURE/00-dynemb-gpu.pth" || return 1
  python3 - <<'EOF' || return 1
import importlib, sys
for name in ("numpy", "torch", "onnx", "onnxruntime", "transformers", "tokenizers", "PIL",
             "grpc", "google.protobuf", "tritonclient.grpc", "typer", "rich", "dynemb"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
import numpy, torch
assert numpy.__version__.startswith("1."), numpy.__version__
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0))
EOF
  STUB=$SITE/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub
  LIBDIR=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
  echo "stub libraries not found (empty: all found):"
  LD_LIBRARY_PATH=$LIBDIR:$SITE/nvidia_pytriton.libs ldd "$STUB" | grep "not found" || true
}

if ! setup > "$OUT/setup.log" 2>&1; then
  tail -n 40 "$OUT/setup.log"
  echo "setup failed: see setup.log"
  exit 1
fi
tail -n 8 "$OUT/setup.log"

DYNEMB_EXPECT_GPU=1 timeout 90 python3 -m pytest tests/gpu -q -p no:cacheprovider \
  > "$OUT/pytest-gpu.log" 2>&1
echo "tests/gpu exit status $? (124: stopped at 90 s):"
tail -n 15 "$OUT/pytest-gpu.log"

timeout 360 python3 -m dynemb bench-gpu --out "$OUT" --budget-s 300
echo "bench-gpu exit status $? (124: stopped at 360 s)"
