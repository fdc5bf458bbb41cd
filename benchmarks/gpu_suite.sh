#!/usr/bin/env bash
# Accelerator benchmark suite: one prepared script, run from the repository root.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh
#
# Writes under $OUT (at most 4 files): results.jsonl (one JSON object per benchmark run,
# failures and skips included), suite.log (everything printed), figures.txt (one readable
# line per result, rewritten after every item, so a window that closes mid-suite still
# leaves the figures of the items done), summary.txt (one line per run). Each benchmark
# runs in its own process under `timeout`, so a crash or an OOM does not stop the others;
# items run in priority order and the suite stops starting new ones when its time budget
# (SUITE_BUDGET_S, default 540 s: one device command may run 600 s) is spent; an item
# started late gets only the time left. A train item writes a `compiled` record (compile
# time, FLOPs, memory) before it steps, so even a timed-out item leaves its compile figures.
#
# The order is for a 15-minute device window, machine start included (1-2 minutes): the
# two figures the project needs come first, the paper-size pretraining step (step time,
# MFU, memory, kernel profile) and the 12-frame fine-tuning step, each a cold compile of
# about 3 minutes (H200, 2026-11-28); the smoke items follow (the paper items record
# whether their loss is finite, from synthetic parameters).
# Precompiled executables are not used: XLA compiles these programs here without a GPU
# (t2v2t_jax/training/gpu_topology.py) and jax.experimental.serialize_executable
# serializes them, but a serialized executable loads only under the jaxlib and CUDA plugin
# that made it, and the lent machines run jax 0.11.2 with the CUDA 13 plugin while the
# project pins jax 0.10.2 (the plugin's 174 MB wheel cannot travel in the 64 MiB tree).
#
# Environment:
#   OUT             output folder (required)
#   BENCH_SIZE      paper (default) | test: every item at the tiniest size, for a CPU dry run
#   SUITE_BUDGET_S  wall-clock budget of the whole suite in seconds (default 540)
#   PYTHON          interpreter (default python3)
#   SUITE_SKIP      comma-separated item names not to run (e.g. smoke_train,smoke_rerank
#                   once the smoke items have passed on that device kind: each costs a
#                   compile, about a minute of scarce device time)
#
# Items, in priority order (paper size = B/16 + BERT-base, 224 px, text 32 tokens, bf16,
# parameters drawn on the host (`--init synthetic`), VTC + VTM + MLM unless noted):
#   1 train t2v2t, 4 frames, batch 32/device, no remat       (the MFU figure; kernel profile)
#   2 fine-tune t2v2t, 12 frames, no MLM, batch 32, remat     (does it fit in 80 GB?)
#   3 smoke: tiny train step with the real initialisers (finite loss asserted) and a tiny
#     t2v2t rerank step, on the device
#   4 rerank, MSR-VTT shape (12 frames, 32 tokens), t2v2t and v2t, 128 pairs a call
#   5 train v2t, batch 32, no remat                           (VindLU's model)
#  5b train t2v2t, batch 32, attention_impl=cudnn             (fused attention kernels)
#   6 train t2v2t b32 remat; 7 b64 remat; 8 b64 no remat; 9 v2t b32 remat
#  10 rerank MSR-VTT shape t2v2t_naive and joint; ActivityNet shape (32 frames, 64
#     tokens) t2v2t and v2t
#  11 fine-tune t2v2t 12 frames batch 32 without remat: compile only (memory)
# On an H200 (session 1) the tiny train step alone took 52 s to compile: expect each
# paper-size item to be mostly compile time, and the budget to end the list early.
# SUITE_FAST_COMPILE=1 adds --xla_gpu_autotune_level=0 to XLA_FLAGS (no GEMM autotuning:
# faster compiles, possibly slower kernels; recorded in suite.log).
set -u -o pipefail

: "${OUT:?set OUT to the output folder}"
BENCH_SIZE="${BENCH_SIZE:-paper}"
SUITE_BUDGET_S="${SUITE_BUDGET_S:-540}"
SUITE_SKIP=",${SUITE_SKIP:-},"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/suite.log"
SUMMARY="$OUT/summary.txt"
FIGURES="$OUT/figures.txt"
: > "$RESULTS"; : > "$LOG"; : > "$SUMMARY"; : > "$FIGURES"

export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# One process at a time owns the GPU: allocate on demand (the allocator's peak is then
# the step's real peak) and allow up to 95% of the memory (the "fits in 80 GB" check).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# A persistent compilation cache shared by the items (outside $OUT): XLA's per-fusion
# autotuning results are kept in it too, so items after the first compile faster. The
# first paper-size item's compile_s is a cold compile; later ones are warm-autotune.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/t2v2t_bench_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"

if [ "${SUITE_FAST_COMPILE:-0}" = 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

log() { echo "[suite +$(elapsed)s] $*" | tee -a "$LOG"; }

{
  echo "== gpu_suite $(date -u +%FT%TZ) BENCH_SIZE=$BENCH_SIZE budget=${SUITE_BUDGET_S}s XLA_FLAGS='${XLA_FLAGS:-}'"
  echo "== host: $(uname -srm), $(nproc) cores"
  (nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi")
  $PY - <<'EOF' 2>&1 || true
import jax, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices", jax.devices())
EOF
  echo "== git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} 2>&1 | tee -a "$LOG"

if [ "$BENCH_SIZE" = "test" ]; then
  # Everything at the tiniest size (CPU dry run of this script).
  P="--preset test"
  P12="--preset test --frames 4"
  B32="--batch 4"; B64="--batch 8"
  STEPS="--steps 2 --warmup 2"
  RR="--preset test --rerank-batch 8 --steps 2 --host-batches 1"
  T_FIRST=300; T_TRAIN=300; T_SMOKE=300; T_EVAL=300
else
  P="--preset paper"
  P12="--preset paper --frames 12"
  B32="--batch 32"; B64="--batch 64"
  STEPS="--steps 10 --warmup 3"
  RR="--preset paper --rerank-batch 128 --steps 5 --host-batches 2"
  T_FIRST=240; T_TRAIN=200; T_SMOKE=90; T_EVAL=150
fi

# figures: one readable line per result into $FIGURES (a train item's `compiled` record
# is shown only when the item left no final record, e.g. when it timed out while stepping).
figures() {
"$PY" - "$RESULTS" > "$FIGURES" 2>&1 <<'EOF'
import json, sys
def f(x, fmt):
  return "-" if x is None else format(x, fmt)
records = []
for line in open(sys.argv[1]):
  try:
    records.append(json.loads(line))
  except ValueError:
    pass
for i, r in enumerate(records):
  b = r.get("benchmark")
  if b == "train_step" and r.get("status") == "compiled":
    nxt = records[i + 1] if i + 1 < len(records) else {}
    if nxt.get("benchmark") == "train_step" and nxt.get("config") == r.get("config"):
      continue
  if b == "train_step":
    mem = r.get("device_peak_bytes_in_use") or r.get("compiled_total_bytes")
    step = r.get("step_s_median")
    mfu = r.get("mfu")
    print(f"train {r.get('mode')} {r.get('frames')}f b{r.get('batch_per_device')} "
          f"remat={r.get('remat')} {r.get('losses', 'mlm=' + str(r.get('mlm')))} [{r.get('status')}]: "
          f"step {f(step and step * 1e3, '.1f')} ms, {f(r.get('samples_per_s'), '.1f')} samples/s, "
          f"MFU {f(mfu and 100 * mfu, '.1f')}%, XLA/analytic {f(r.get('xla_over_analytic'), '.3f')}, "
          f"compile {f(r.get('compile_s'), '.0f')} s, mem {f(mem and mem / 2**30, '.1f')} GiB "
          f"(compiled {f(r.get('compiled_total_bytes') and r['compiled_total_bytes'] / 2**30, '.1f')}), "
          f"recompiles {r.get('recompiles_after_step2')}")
  elif b == "eval_rerank":
    mfu = r.get("mfu")
    print(f"rerank {r.get('dataset')} {r.get('mode')} [{r.get('status')}]: "
          f"{f(r.get('device_pairs_per_s'), ',.0f')} pairs/s device, "
          f"{f(r.get('host_path_pairs_per_s'), ',.0f')} pairs/s host path, full eval "
          f"{f(r.get('projected_rerank_s_device'), ',.0f')} s device / "
          f"{f(r.get('projected_rerank_s_host_path'), ',.0f')} s host path, MFU "
          f"{f(mfu and 100 * mfu, '.1f')}%, mem {f(r.get('compiled_total_bytes') and r['compiled_total_bytes'] / 2**30, '.1f')} GiB")
  else:
    print(f"{r.get('item')}: {r.get('status')}")
EOF
}

# run NAME TIMEOUT CMD...: one benchmark process; its JSON lines go to results.jsonl.
run() {
  local name="$1" limit="$2"; shift 2
  if [[ "$SUITE_SKIP" == *",$name,"* ]]; then
    log "SKIP $name (SUITE_SKIP)"
    echo "{\"benchmark\": \"suite\", \"item\": \"$name\", \"status\": \"skipped_by_request\"}" >> "$RESULTS"
    echo "$name: skipped (SUITE_SKIP)" >> "$SUMMARY"
    return 0
  fi
  local left=$(( SUITE_BUDGET_S - $(elapsed) ))
  if [ "$left" -lt 60 ]; then
    log "SKIP $name (budget: ${left}s left)"
    echo "{\"benchmark\": \"suite\", \"item\": \"$name\", \"status\": \"skipped_budget\"}" >> "$RESULTS"
    echo "$name: skipped (budget)" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "START $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" "$@" --json-out "$RESULTS" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "{\"benchmark\": \"suite\", \"item\": \"$name\", \"status\": \"timeout\", \"timeout_s\": $limit}" >> "$RESULTS"
  fi
  log "END $name rc=$rc in ${dt}s"
  echo "$name: rc=$rc ${dt}s" >> "$SUMMARY"
  figures
  return 0
}

TS=benchmarks/train_step.py
ER=benchmarks/eval_rerank.py

# 1. The MFU figure: paper-size pretraining step, the paper's model, with a kernel
#    profile of 3 more steps (where the device time goes: benchmarks/kernel_profile.py).
run train_t2v2t_b32 "$T_FIRST" $TS $P --mode t2v2t $B32 $STEPS --profile 3
# 2. Does the 12-frame fine-tuning step fit at 32 clips per device (with remat)? Its
#    step time and MFU.
run ft12_t2v2t_b32_remat "$T_FIRST" $TS $P12 --mode t2v2t --no-mlm --remat $B32 $STEPS
# 3. Smoke test on the device: tiny train step with the model's real initialisers (exit
#    code != 0 on a non-finite loss) and a tiny t2v2t rerank step.
run smoke_train "$T_SMOKE" $TS --preset test --mode t2v2t --init real --steps 2 --warmup 2
run smoke_rerank "$T_SMOKE" $ER --preset test --modes t2v2t --rerank-batch 8 --steps 2 --host-batches 1
# 4. Rerank throughput, MSR-VTT shape (12 frames): the paper's mode and VindLU's.
run rerank_msrvtt "$T_EVAL" $ER $RR --datasets msrvtt --modes t2v2t,v2t
# 5. VindLU's model.
run train_v2t_b32 "$T_TRAIN" $TS $P --mode v2t $B32 $STEPS
# 5b. cuDNN's fused attention where the model allows it (the video layers; the text and
#     fusion layers keep the explicit path while attention dropout is active).
if [ "$BENCH_SIZE" != "test" ]; then  # cuDNN exists on GPUs only
  run train_t2v2t_b32_cudnn "$T_TRAIN" $TS $P --mode t2v2t $B32 $STEPS --attention-impl cudnn
fi
# 6-9. Remat and batch 64.
run train_t2v2t_b32_remat "$T_TRAIN" $TS $P --mode t2v2t $B32 --remat $STEPS
run train_t2v2t_b64_remat "$T_TRAIN" $TS $P --mode t2v2t $B64 --remat $STEPS
run train_t2v2t_b64 "$T_TRAIN" $TS $P --mode t2v2t $B64 $STEPS
run train_v2t_b32_remat "$T_TRAIN" $TS $P --mode v2t $B32 --remat $STEPS
# 10. The other two modes at the MSR-VTT shape, then the ActivityNet shape (32 frames,
#     64 tokens).
run rerank_msrvtt_more "$T_EVAL" $ER $RR --datasets msrvtt --modes t2v2t_naive,joint
run rerank_anet "$T_EVAL" $ER $RR --datasets anet --modes t2v2t,v2t
# 11. 12 frames without remat: does it fit? (compile only: memory analysis)
run ft12_t2v2t_b32_noremat_mem "$T_TRAIN" $TS $P12 --mode t2v2t --no-mlm $B32 --compile-only

log "DONE in $(elapsed)s"
echo "total: $(elapsed)s" >> "$SUMMARY"

figures
cat "$FIGURES" | tee -a "$SUMMARY" "$LOG"
exit 0
