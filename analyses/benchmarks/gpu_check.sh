#!/usr/bin/env bash
# One call on a lent GPU: the CUDA tests (tests/test_gpu.py, every route against the CPU) and the
# GPU benchmark (run_gpu.py). Sized for < 8 minutes on an H200, checkpoint build included.
#   bash analyses/benchmarks/gpu_check.sh          (results under $OUT, or analyses/benchmarks/out)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-analyses/benchmarks/out}"
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
timeout 150 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 330 python3 analyses/benchmarks/run_gpu.py --out "$out" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
