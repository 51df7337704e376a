#!/usr/bin/env bash
# One prepared GPU call: the Triton runtime and kernel tests compiled on CUDA, then `nnpq bench` on the
# water boxes (555 / 4,440 / 14,985 atoms), FP32 TorchANI in the same run.
#
#   scripts/gpu_bench.sh            # on a CUDA machine; results under $OUT (tests.txt, bench.json, bench.txt)
#   scripts/gpu_bench.sh --dry-run  # on a CPU: the same steps at toy size (Triton's interpreter, ethanol)
#
# Installs nothing: torch, triton, torchani, numpy, safetensors, tqdm and pytest must import (put a
# `pip install --no-deps --target DIR` folder on PYTHONPATH). TORCHANI_DATA_DIR: the ANI-2x state dicts
# (default shared/torchani under the repository root). The model timed is ANI-2x with every hidden layer
# rounded to per-channel INT8 (no calibration), as tests/conftest.py's w8_path.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python}
export TORCHANI_DATA_DIR=${TORCHANI_DATA_DIR:-$PWD/shared/torchani} HF_HUB_OFFLINE=1 TORCHANI_NO_WARN_EXTENSIONS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ ! -d $TORCHANI_DATA_DIR/StateDicts ]]; then
  echo "no ANI weights: $TORCHANI_DATA_DIR/StateDicts is missing; set TORCHANI_DATA_DIR" >&2
  exit 2
fi
if (( DRY )); then
  DEVICE=cpu INTERPRET=1 SYSTEMS=(ethanol) BENCH_ARGS=(--repeats 1 --modes exact)
else
  DEVICE=cuda INTERPRET=0 SYSTEMS=(water-box water-box-2x water-box-3x) BENCH_ARGS=(--repeats 5)
fi
echo "device $DEVICE, results in $OUT"
MODEL=$OUT/ani2x-w8.nnpq
"$PY" - "$MODEL" <<'PYEOF' || exit 1
import sys
from nnpq.artifact import save_artifact
from nnpq.models import load_fp32
from nnpq.pipeline import source_info
from nnpq.quant.apply import quantize_model
from nnpq.spec.plan import default_plan

save_artifact(sys.argv[1], quantize_model(load_fp32("ani2x"), default_plan()), default_plan(), source_info("ani2x"))
print("model", sys.argv[1])
PYEOF
# the tests: on CUDA compiled (TRITON_INTERPRET=0), in the dry run interpreted; a failure does not stop the bench
TESTS=(tests/test_triton_runtime.py)
(( DRY )) || TESTS+=(tests/test_triton_kernels.py)
TRITON_INTERPRET=$INTERPRET timeout 300 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 \
  | tail -n 40 | tee "$OUT/tests.txt"
# MD-step rows need openmm and openmm-ml, which a bare GPU machine lacks: calls only
timeout 420 "$PY" -m nnpq.cli bench "$MODEL" --device "$DEVICE" --systems "${SYSTEMS[@]}" --no-md --quiet \
  "${BENCH_ARGS[@]}" -o "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
status=$?
cat "$OUT/bench.txt"
exit $status
