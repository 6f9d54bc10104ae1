#!/usr/bin/env bash
# On the lent GPU: for each model, write the synthetic GGUF, run `ouzel bench` (pp512/tg128, median
# of RUNS), optionally the frontier walk (WALK=16k) and the decode/prefill profile (PROFILE=1).
# Carry: .whl (gguf wheel) and bench/models/tokenizer.gguf. Logs go to $OUT/<model>.*.log.
#   MODELS="ds4flash-l8-q2 qwen3moe-30b-a3b-q4km llama8b-q4km" RUNS=3 WALK=16k PROFILE=1 bash bench/gpu_models.sh
set -uo pipefail
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for MODEL in ${MODELS:-llama8b-q4km}; do
  t0=$(date +%s)
  python3 bench/make_models.py $MODEL --out /tmp/m --tokenizer-from bench/models/tokenizer.gguf 2>&1 | tail -1
  M=$(ls /tmp/m/$MODEL*.gguf | head -1)
  echo "== $MODEL written in $(( $(date +%s) - t0 )) s: ouzel bench --pp 512 --tg 128 --runs ${RUNS:-3}"
  timeout ${BENCH_S:-150} python3 -m ouzel bench -m $M --device cuda --pp 512 --tg 128 --runs ${RUNS:-3} \
    --csv "$OUT/$MODEL.pp512.csv" 2>&1 | tee "$OUT/$MODEL.bench.log" | tail -6
  if [[ ${WALK:-} ]]; then
    echo "== $MODEL walk --frontiers $WALK --tg 64"
    timeout ${WALK_S:-120} python3 -m ouzel bench -m $M --device cuda --frontiers $WALK --tg 64 \
      --csv "$OUT/$MODEL.walk.csv" 2>&1 | tee "$OUT/$MODEL.walk.log" | tail -5
  fi
  if [[ ${PROFILE:-} ]]; then
    echo "== $MODEL profile"
    timeout ${PROFILE_S:-90} python3 bench/profile_decode.py $M > "$OUT/$MODEL.profile.log" 2>&1
    grep -E "tok/s|GPU time|captures" "$OUT/$MODEL.profile.log"
  fi
  rm -f $M
done
