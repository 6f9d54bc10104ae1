#!/usr/bin/env bash
# Decode-path check and timing on the lent GPU: kernel + graph tests, GEMV timings, then
# `ouzel bench` on a full-depth synthetic model with and without the CUDA-graph decode.
# Carry: .whl (gguf wheel) and bench/models/tokenizer.gguf. Logs go to $OUT.
#   MODEL=llama8b-q4km LAYERS= STAGES="test gemv bench" bash bench/gpu_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-llama8b-q4km}; LAYERS=${LAYERS:-}; STAGES=${STAGES:-test gemv bench}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $STAGES == *test* ]]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_graph.py \
    $(ls tests/test_triton_attention.py 2>/dev/null) 2>&1 | tee "$OUT/pytest.log" | tail -15
fi
if [[ $STAGES == *gemv* ]]; then
  timeout 240 python3 bench/gemv_bench.py 2>&1 | tee "$OUT/gemv.log"
fi
if [[ $STAGES == *attn* ]] && [[ -f bench/bench_decode_attention.py ]]; then
  timeout 120 python3 bench/bench_decode_attention.py 2>&1 | tee "$OUT/attn.log"
fi
if [[ $STAGES == *bench* ]]; then
  t0=$(date +%s)
  python3 bench/make_models.py $MODEL --out /tmp/m ${LAYERS:+--layers $LAYERS} --tokenizer-from bench/models/tokenizer.gguf 2>&1 | tail -2
  echo "model written in $(( $(date +%s) - t0 )) s"
  M=$(ls /tmp/m/$MODEL*.gguf | head -1)
  echo "== graphs: ouzel bench -m $M --device cuda --pp 512 --tg 128"
  timeout 200 python3 -m ouzel bench -m $M --device cuda --pp 512 --tg 128 2>&1 | tee "$OUT/bench_graph.log" | tail -8
  echo "== eager (OUZEL_NO_CUDA_GRAPH=1) --tg 32"
  OUZEL_NO_CUDA_GRAPH=1 timeout 150 python3 -m ouzel bench -m $M --device cuda --pp 512 --tg 32 2>&1 | tee "$OUT/bench_eager.log" | tail -3
  if [[ ${FRONTIERS:-} ]]; then
    echo "== walk: --frontiers $FRONTIERS --tg 64"
    timeout 300 python3 -m ouzel bench -m $M --device cuda --frontiers $FRONTIERS --tg 64 --csv "$OUT/walk.csv" 2>&1 | tee "$OUT/bench_walk.log" | tail -8
  fi
fi
