#!/usr/bin/env bash
# On the lent GPU, the issue's table in one call: the three synthetic models written in parallel,
# then for each `ouzel bench` pp512/tg128 (median of RUNS) and the walk to 16k (tg@16k).
# Carry: .whl (gguf wheel) and bench/models/tokenizer.gguf. One log per model, $OUT/<model>.log, and
# the tests' whole output in $OUT/tests.log
# (only 8 files come back from a call); CSVs and the writers' logs under /tmp/logs.
#   TESTS="tests/test_x.py ..." RUNS=3 WALK=16k bash bench/gpu_all.sh   (TESTS_K: a pytest -k expression)
# MODELS="" runs only TESTS and PRE (unset: all three models). PP=2048: that prompt length instead of 512.
# AB="VAR=1 ...;VAR2=1 ..." repeats each pp/tg bench once per ';'-separated set of variables (A/B of
# switches in one call).
# PRE="cmd" runs cmd while the models are written (after TESTS), its output in $OUT/pre.log.
# WALK_ENV="VAR=1 ..." sets variables for the walk only (e.g. OUZEL_PREFILL_CHUNK=2048).
# POST='cmd' runs cmd on each model's file ($M) after its benches, its output in the model's log.
# PROFILE=N adds bench/profile_decode.py per model (the first N kernels of a decode step in order,
# the host's profile of a prefill) into the model's log.
set -uo pipefail
source bench/device_env.sh
MODELS=${MODELS-"llama8b-q4km qwen3moe-30b-a3b-q4km ds4flash-l8-q2"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
mkdir -p /tmp/logs
for MODEL in $MODELS; do  # numpy-bound, one core each: in parallel (~40 GB of disk in all)
  python3 bench/make_models.py $MODEL --out /tmp/m/$MODEL --tokenizer-from bench/models/tokenizer.gguf > "/tmp/logs/$MODEL.make.log" 2>&1 &
done
if [[ ${TESTS:-} ]]; then
  timeout ${TESTS_S:-120} python3 -m pytest -q -x -p no:cacheprovider $TESTS ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
    | tee "$OUT/tests.log" | tail -3
fi
if [[ ${PRE:-} ]]; then  # more work while the models are written (a microbenchmark): $OUT/pre.log
  bash -c "$PRE" > "$OUT/pre.log" 2>&1
  tail -${PRE_TAIL:-20} "$OUT/pre.log"
fi
wait
echo "models written in $(( $(date +%s) - t0 )) s"
for MODEL in $MODELS; do
  M=/tmp/m/$MODEL/$MODEL.gguf
  echo "== $MODEL"
  timeout ${BENCH_S:-120} python3 -m ouzel bench -m $M --device cuda --pp ${PP:-512} --tg 128 --runs ${RUNS:-3} \
    --csv "/tmp/logs/$MODEL.pp${PP:-512}.csv" 2>&1 | tee -a "$OUT/$MODEL.log" | grep -E "pp-tg|peak|floor ->"
  if [[ ${AB:-} ]]; then  # the same pp/tg bench again with each set of environment switches
    IFS=';' read -ra VARIANTS <<< "$AB"
    for V in "${VARIANTS[@]}"; do
      echo "-- with $V" | tee -a "$OUT/$MODEL.log"
      env $V timeout ${BENCH_S:-120} python3 -m ouzel bench -m $M --device cuda --pp ${PP:-512} --tg 128 \
        --runs ${RUNS:-3} 2>&1 | tee -a "$OUT/$MODEL.log" | grep -E "pp-tg|peak"
    done
  fi
  if [[ ${WALK:-} ]]; then
    env ${WALK_ENV:-} timeout ${WALK_S:-60} python3 -m ouzel bench -m $M --device cuda --frontiers $WALK --tg 64 \
      --csv "/tmp/logs/$MODEL.walk.csv" 2>&1 | tee -a "$OUT/$MODEL.log" | grep -E "frontier|peak"
  fi
  if [[ ${PROFILE:-} ]]; then
    SEQ=$PROFILE HOST=1 timeout ${PROFILE_S:-120} python3 bench/profile_decode.py $M > /tmp/logs/$MODEL.profile 2>&1
    grep -E "graph replay|kernels per step|prefill 512 run" /tmp/logs/$MODEL.profile
    cat /tmp/logs/$MODEL.profile >> "$OUT/$MODEL.log"
  fi
  if [[ ${POST:-} ]]; then  # more work on this model's file ($M), e.g. POST='python3 bench/stage_cost.py $M'
    M=$M timeout ${POST_S:-200} bash -c "$POST" 2>&1 | tee -a "$OUT/$MODEL.log" | tail -${POST_TAIL:-4}
  fi
  rm -f $M
done
