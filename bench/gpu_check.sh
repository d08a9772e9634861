#!/usr/bin/env bash
# GPU readiness check for the OPSD step and the `paper` profiles, on one GPU, no pip, no network
# (the step, loss, rollout and memory checks: under 8 minutes; bench/paper_check.py: at most 7
# more, its timeout; --paper-only runs it alone).
#
# Needs: torch (CUDA), transformers, peft (and accelerate, which peft installs); bitsandbytes for
# the 4-bit run (skipped without it); trl for the TRL side of bench/step.py (opsd_kit alone
# without it). reasoning_gym / math_verify are optional (the bench synthesises its problems).
#
# Builds a random-weight Qwen3-1.7B-shaped model from a config (no download; the tiny
# byte-level tokenizer of opsd_kit.models), then runs
#   bench/step.py  bf16   (opsd_kit vs TRL SDFT, loss check; opsd_kit only without trl)
#   bench/step.py  4-bit  (QLoRA NF4, bf16 compute)
#   bench/loss.py  bf16 and float32 at T=1024, V=151936, H=2048 (the output head is never
#                  quantised, bitsandbytes skips lm_head, so the 4-bit loss is the bf16 one)
#   bench/rollout.py  bf16: rollout_backend="fast" (fused decoder) vs plain generate, greedy
#                  match rate, sampled log-prob agreement, fraction of the bandwidth bound
#   bench/memory.py   memory mode: one OPSD step at V=151936, 1024 completion tokens, gradient
#                  checkpointing, chunked divergence vs TRL's full-logit loss (float32)
#   bench/paper_check.py  the `paper` profiles on the same random model: 2 steps each of `paper` and
#                  `paper-qlora` OPSD (4-bit: with bitsandbytes) and of `paper` GRPO, RLSD and SFT;
#                  the paper's evaluation protocol (eval_protocol_for) on 3 problems at 32 new
#                  tokens (the hub benchmarks are not loaded: no network); OPSD with vLLM rollouts
#                  where vllm is installed. It says what it skipped and why.
#   bench/eval.py     evaluation: the fast engine vs generate (greedy, cpu-demo protocol, base and
#                  a random LoRA adapter), problems/s, greedy match rate (its own block, at the end)
# and writes everything under $OUT (default: bench/out-gpu): gpu_check.log (all output),
# step_bf16.json, step_4bit.json, loss_bf16.txt, loss_fp32.txt, rollout.json, memory.json,
# paper.json, eval.json, summary.txt.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --paper-only # only the preflight, the model and bench/paper_check.py
#   bash bench/gpu_check.sh --cpu-smoke  # the same flow on CPU with a small Qwen3-shaped model
#                                        # (--cpu-smoke --paper-only: the paper part alone)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out-gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OPSD_KIT_CACHE="${OPSD_KIT_CACHE:-/tmp/opsd_kit_cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"; : >"$SUMMARY"
START=$(date +%s)

CPU_SMOKE=0; PAPER_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) CPU_SMOKE=1 ;;
    --paper-only) PAPER_ONLY=1 ;;
    *) echo "unknown argument: $arg (use --cpu-smoke and/or --paper-only)"; exit 2 ;;
  esac
done
PAPER_RUNS="paper:opsd paper-qlora:opsd paper:grpo paper:rlsd paper:sft"
if [ "$CPU_SMOKE" = 1 ]; then
  DEVICE=cpu; MODEL=qwen3-small-random; TOK=4; PROBLEMS=2; MICRO=1; REPEATS=1
  T_STEP=900; T_LOSS=300; LOSS_ARGS="--T 64 --V 151936 --H 256 --repeats 1"
  ROLLOUT_ARGS="--dtype float32 --prompts 2 --new-tokens 4 --repeats 1"; T_ROLLOUT=300
  MEMORY_ARGS="--completion 64"; T_MEMORY=300
  PAPER_ARGS="--steps 1 --tokens 4 --eval-tokens 4"; T_PAPER=900
else
  DEVICE=cuda; MODEL=qwen3-1.7b-random; TOK=128; PROBLEMS=8; MICRO=4; REPEATS=2
  T_STEP=150; T_LOSS=45; LOSS_ARGS="--T 1024 --V 151936 --H 2048 --repeats 3"
  ROLLOUT_ARGS="--dtype bfloat16 --prompts 32 --new-tokens 128 --repeats 3"; T_ROLLOUT=120
  MEMORY_ARGS="--hidden 2048 --layers 4 --completion 1024"; T_MEMORY=60
  PAPER_ARGS="--steps 2 --tokens 64 --eval-tokens 32"; T_PAPER=420
fi

say() { echo "$*" | tee -a "$LOG" >>"$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

say "== gpu_check $(date -u +%FT%TZ) device=$DEVICE model=$MODEL out=$OUT"
# -- preflight: what is importable ------------------------------------------------------------
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, json
found = {}
for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "reasoning_gym", "math_verify", "datasets"):
    try:
        found[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        found[m] = f"MISSING ({type(e).__name__})"
import torch
found["cuda"] = torch.cuda.is_available()
found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("preflight:", json.dumps(found))
EOF
grep preflight "$LOG" >>"$SUMMARY"
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "FAIL: no CUDA device visible to torch"; exit 1
fi
for m in torch transformers peft accelerate opsd_kit; do
  if ! has $m; then say "FAIL: cannot import $m (needed by bench/step.py)"; exit 1; fi
done
IMPL=both
if ! "$PY" -c "import trl.experimental.sdft" >/dev/null 2>&1; then
  IMPL=ours; say "NOTE: trl.experimental.sdft not importable: bench/step.py runs opsd_kit only"
fi

# -- the random-weight model (bf16 folder; 4-bit quantises it on load) -------------------------
if ! "$PY" -c "import sys; sys.path.insert(0,'bench'); import _common; print('model folder:', _common.materialise_model('$MODEL', 'bfloat16'))" >>"$LOG" 2>&1; then
  say "FAIL: could not build $MODEL"; tail -20 "$LOG"; exit 1
fi
say "model built at $(elapsed) s"

run_paper() {
  echo "== paper: $PY bench/paper_check.py --model $MODEL --device $DEVICE $PAPER_ARGS --runs $PAPER_RUNS" >>"$LOG"
  # shellcheck disable=SC2086
  timeout "$T_PAPER" "$PY" bench/paper_check.py --model "$MODEL" --device "$DEVICE" $PAPER_ARGS --runs $PAPER_RUNS \
    --json "$OUT/paper.json" >"$OUT/.paper.txt" 2>&1
  local rc=$?
  cat "$OUT/.paper.txt" >>"$LOG"
  grep -E "^\[|^paper_check|^FAIL" "$OUT/.paper.txt" | cut -c1-300 | sed "s/^/[paper] /" >>"$SUMMARY"
  rm -f "$OUT/.paper.txt"
  [ $rc -eq 124 ] && say "[paper] TIMEOUT after $T_PAPER s: the parts after the last line above did not run"
  say "[paper] rc=$rc at $(elapsed) s"
}
if [ "$PAPER_ONLY" = 1 ]; then
  run_paper
  say "== done in $(elapsed) s"
  cat "$SUMMARY"
  exit 0
fi

COMMON=(--model "$MODEL" --device "$DEVICE" --problems "$PROBLEMS" --micro-batch "$MICRO" --new-tokens "$TOK"
        --warmup 1 --repeats "$REPEATS" --chunk-size 128 --lora-r 64 --lora-alpha 128 --lr 5e-6 --temperature 1.1)

run_step() {  # name, extra args...
  local name=$1; shift
  echo "== step $name: $PY bench/step.py ${COMMON[*]} $*" >>"$LOG"
  timeout "$T_STEP" "$PY" bench/step.py "${COMMON[@]}" "$@" --json "$OUT/step_$name.json" >"$OUT/.step_$name.txt" 2>&1
  local rc=$?
  cat "$OUT/.step_$name.txt" >>"$LOG"
  grep -E "^(loss check|ours |trl  |ratios|NOTE|LOSS CHECK|       opsd_kit)" "$OUT/.step_$name.txt" | sed "s/^/[step $name] /" >>"$SUMMARY"
  rm -f "$OUT/.step_$name.txt"
  [ $rc -eq 124 ] && say "[step $name] TIMEOUT after $T_STEP s"
  say "[step $name] rc=$rc at $(elapsed) s"
}

run_step bf16 --dtype bfloat16 --impl "$IMPL"
if has bitsandbytes; then
  run_step 4bit --dtype bfloat16 --quantization 4bit --impl "$IMPL" --skip-loss-check
else
  say "[step 4bit] SKIPPED: bitsandbytes not importable"
fi

for dt in bfloat16 float32; do
  short=$([ $dt = bfloat16 ] && echo bf16 || echo fp32)
  echo "== loss $dt: $PY bench/loss.py --device $DEVICE --dtype $dt $LOSS_ARGS" >>"$LOG"
  timeout "$T_LOSS" "$PY" bench/loss.py --device "$DEVICE" --dtype $dt $LOSS_ARGS >"$OUT/loss_$short.txt" 2>&1
  rc=$?
  cat "$OUT/loss_$short.txt" >>"$LOG"
  tail -6 "$OUT/loss_$short.txt" | sed "s/^/[loss $short] /" >>"$SUMMARY"
  say "[loss $short] rc=$rc at $(elapsed) s"
done
echo "== rollout: $PY bench/rollout.py --model $MODEL --device $DEVICE $ROLLOUT_ARGS" >>"$LOG"
timeout "$T_ROLLOUT" "$PY" bench/rollout.py --model "$MODEL" --device "$DEVICE" $ROLLOUT_ARGS \
  --json "$OUT/rollout.json" >"$OUT/rollout.txt" 2>&1
rc=$?
cat "$OUT/rollout.txt" >>"$LOG"
grep -E "^(greedy|max |fast |plain|bandwidth)" "$OUT/rollout.txt" | sed "s/^/[rollout] /" >>"$SUMMARY"
say "[rollout] rc=$rc at $(elapsed) s"

echo "== memory: $PY bench/memory.py --device $DEVICE $MEMORY_ARGS" >>"$LOG"
timeout "$T_MEMORY" "$PY" bench/memory.py --device "$DEVICE" $MEMORY_ARGS --json "$OUT/memory.json" \
  >"$OUT/memory.txt" 2>&1
rc=$?
cat "$OUT/memory.txt" >>"$LOG"
tail -3 "$OUT/memory.txt" | sed "s/^/[memory] /" >>"$SUMMARY"
say "[memory] rc=$rc at $(elapsed) s"
run_paper

# -- evaluation engines (bench/eval.py): the fast engine vs generate, greedy, on the GPU ----------
# A separate block: the cpu-demo evaluation protocol on the random-weight model (no download;
# bench_problems synthesises the sums without reasoning_gym), both engines side by side in fresh
# processes, the greedy match rate and where rows part the logit gap. vLLM is not part of
# bench/eval.py: whether it is importable here is only reported.
if [ "$DEVICE" = cuda ]; then EVAL_ARGS="--problems 48 --new-tokens 128 --batch-size-fast 48 --batch-size-hf 48 --repeats 1"; T_EVAL=240
else EVAL_ARGS="--problems 4 --new-tokens 8 --batch-size-fast 4 --batch-size-hf 4 --repeats 1 --gemm-size 256"; T_EVAL=300; fi
if has vllm; then say "[eval] vllm importable (not benchmarked by bench/eval.py)"
else say "[eval] vllm not importable: no vLLM evaluation on this machine"; fi
echo "== eval: $PY bench/eval.py --model $MODEL $EVAL_ARGS" >>"$LOG"
timeout "$T_EVAL" "$PY" bench/eval.py --model "$MODEL" $EVAL_ARGS --json "$OUT/eval.json" >"$OUT/eval.txt" 2>&1
rc=$?
cat "$OUT/eval.txt" >>"$LOG"
grep -E "^(  repeat|  sweep|base|adapter|speedup)" "$OUT/eval.txt" | sed "s/^/[eval] /" >>"$SUMMARY"
[ $rc -eq 124 ] && say "[eval] TIMEOUT after $T_EVAL s"
say "[eval] rc=$rc at $(elapsed) s"

say "== done in $(elapsed) s"
cat "$SUMMARY"
