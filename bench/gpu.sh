#!/usr/bin/env bash
# heft on one NVIDIA GPU (the H200 machine: JAX with CUDA, flax, optax, orbax, tensorstore and
# sentencepiece in its image, nothing else reachable), in one go and well under 8 minutes:
#   1. install heft without touching the image's JAX: `pip install --no-deps --no-build-isolation`,
#      plus, for any module heft imports that the image lacks, a wheel brought along in
#      bench/wheels/ (fill it here first: pip download --no-deps -d bench/wheels ml-collections);
#   2. bench/bench_gpu.py: the bf16 matmul peak measured in the same run, a ~1.06B Llama-shaped
#      model at sequence 2048 trained with model.attention=xla and =flash (cuDNN), tokens/s, MFU
#      against the spec (989 TFLOP/s) and the measured peak, peak memory, and a save/restore.
#
#     bash bench/gpu.sh              # on the GPU machine
#     bash bench/gpu.sh --cpu        # the same steps at a tiny shape on a CPU (CI runs this)
# Extra arguments go to bench_gpu.py (--steps=N, --warmup=N, --batch=N).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
if [ "$cpu" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi
python=${PYTHON:-python3}

echo "== versions"
"$python" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "tensorstore", "ml_collections", "numpy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError:
        print(name, "MISSING")
PY

echo "== install heft (no dependencies: the image's JAX stays as it is)"
if "$python" -c "import heft.train, heft.model" 2>/dev/null; then
  echo "heft already importable from $("$python" -c 'import heft.model, os; print(os.path.dirname(heft.model.__file__))')"
else
  missing=$("$python" - <<'PY'
import importlib.util
wanted = {"ml_collections": "ml-collections", "absl": "absl-py", "etils": "etils"}  # what the bench imports beyond the image
print(" ".join(pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None))
PY
)
  if [ -n "$missing" ]; then
    echo "missing: $missing (from bench/wheels)"
    "$python" -m pip install --no-deps --no-index --find-links "$root/bench/wheels" $missing
  fi
  "$python" -m pip install --no-deps --no-build-isolation --no-index -e "$root"
fi

echo "== bench"
start=$(date +%s)
"$python" bench/bench_gpu.py "$@"
echo "== done in $(( $(date +%s) - start )) s"
