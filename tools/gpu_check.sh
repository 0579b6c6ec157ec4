#!/usr/bin/env bash
# One unattended GPU check of the Triton kernels (fits in ~8 minutes on an H100/H200):
#   1. environment report (nvidia-smi, versions); needs torch + triton already installed, installs nothing
#   2. tests/test_kernels.py compiled on the GPU (NEKOMATA_TEST_DEVICE=cuda, larger bf16 shapes too)
#   3. tools/bench_kernels.py: ours vs torch at nekomata-7b shapes, then a launch-config sweep if time allows
# Logs, bench_kernels.json and sweep.json go to $OUT (the device runner's output folder) or /tmp/nekomata_gpu_check.
# Exit status: 0 only when the tests and the benchmark both succeeded (the sweep is informational).
set -euo pipefail

cd "$(dirname "$0")/.."
out_dir="${OUT:-/tmp/nekomata_gpu_check}"
mkdir -p "$out_dir"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1  # our launches choose explicitly; silences triton 3.9's notice
status=0

echo "== nvidia-smi"
nvidia-smi || { echo "nvidia-smi failed: no NVIDIA GPU/driver visible"; exit 1; }

echo "== versions"
if ! python -c "import triton" 2>/dev/null; then
    echo "triton is not importable in this Python ($(command -v python)); install triton (pip install triton)" \
         "and rerun. Nothing was installed by this script."
    exit 1
fi
python - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch does not see a CUDA device"
print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
EOF

echo "== tests (GPU, compiled)"
if ! NEKOMATA_TEST_DEVICE=cuda timeout 330 python -m pytest tests/test_kernels.py -q -rfE -p no:cacheprovider \
        2>&1 | tee "$out_dir/test_kernels.log"; then
    echo "!! kernel tests FAILED (see $out_dir/test_kernels.log)"
    status=1
fi

echo "== benchmark (median of triton.testing.do_bench)"
if ! timeout 240 python tools/bench_kernels.py --json "$out_dir/bench_kernels.json" \
        2>&1 | tee "$out_dir/bench_kernels.log"; then
    echo "!! benchmark FAILED or timed out (see $out_dir/bench_kernels.log)"
    status=1
fi

remaining=$(( 470 - SECONDS ))
if (( remaining > 60 )); then  # tuning data only: a timeout here does not fail the check
    echo "== launch-config sweep (${remaining}s budget)"
    timeout "$remaining" python tools/bench_kernels.py --sweep --json "$out_dir/sweep.json" \
        2>&1 | tee "$out_dir/sweep.log" || echo "(sweep stopped early)"
else
    echo "== launch-config sweep skipped (${remaining}s left)"
fi

echo "== done in ${SECONDS}s; status $status; outputs in $out_dir"
exit "$status"
