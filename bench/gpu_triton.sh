#!/usr/bin/env bash
# Triton GGUF kernels on the lent GPU: pytest, bench/check_triton.py, then `ouzel bench` on a
# reduced-depth llama8b-q4km (Triton fp32, Triton + bf16 prefill, torch reference).
# Carry: .whl (gguf wheel) and bench/models/tokenizer.gguf. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tee "$OUT/pytest.log" | tail -4
timeout 330 python3 bench/check_triton.py ${CHECK_ARGS:-} 2>&1 | tee "$OUT/check.log" | grep -v -e "^ok  " -e "^progress:"
python3 bench/make_models.py llama8b-q4km --out /tmp/m --layers 8 --tokenizer-from bench/models/tokenizer.gguf
M=/tmp/m/llama8b-q4km-l8.gguf
for mode in triton triton2 bf16 reference; do
  case $mode in
    triton|triton2) env=(); tg=64;;
    bf16) env=(OUZEL_CUDA_PREFILL_DTYPE=bf16); tg=64;;
    reference) env=(OUZEL_NO_TRITON=1); tg=8;;
  esac
  echo "== ouzel bench ($mode): python3 -m ouzel bench -m $M --device cuda --pp 512 --tg $tg"
  env "${env[@]}" timeout 150 python3 -m ouzel bench -m $M --device cuda --pp 512 --tg $tg 2>&1 | tee "$OUT/bench_$mode.log" | tail -6
done
