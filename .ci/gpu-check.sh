#!/usr/bin/env bash
# The GPU check, in one device call: step time and peak memory of igrpo.py (plain: generate with a
# dynamic cache, the output layer on the completion positions) and scale.py (compiled decoding,
# blockwise log-probs), beside TRL and the floor; then scale.py's FSDP2 path on this one GPU
# (torchrun, world size 1) (../shared/bench/gpu_compare.py, which runs igrpo.py by its command line; a copy of it
# edited to run scale.py instead measures scale.py). Never run here: prepare here.
#
# Prepare (on the networked machine, from the repository root; ../shared/bench/README.md):
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 \
#       pytest pluggy iniconfig pygments   # the CUDA test subset below
#   cp ../shared/bench/gpu_compare.py .whl/
# Run: the device tool, command "bash .ci/gpu-check.sh", carry [".whl"], timeout_s 600.
# CPU smoke test of this script: GPU_CHECK_TINY=1 bash .ci/gpu-check.sh (tiny model, 16 tokens, no TRL).
#
# Expected order and cost on one H100/H200 (about 8 minutes; each run is its own process, 4 steps, the
# median step excludes the first, which holds the compiles):
#   1. build the 0.5B-shaped random model                                        ~20 s
#   2. scale.py --algo grpo (compiled decoding), then igrpo.py --algo grpo (plain)
#   3. scale.py --algo igrpo, then igrpo.py --algo igrpo
#   4. TRL GRPOTrainer, floor (plain generate dynamic/static + fwd/bwd/AdamW)
#   5. summary: one line per run (median step s, peak GiB), printed before the extras below
#   6. scale.py's tests on CUDA: compiled decoding vs training's log-probs, fixed shapes, blockwise
#   7. bench.py step at a 0.5B-like shape: each phase's peak, the state's bytes per parameter   ~60 s
#   8. torchrun --nproc-per-node 1 scale.py --algo grpo: FSDP2 at world size 1, its median step  ~60 s
# The log is copied to $OUT after each part, so a run cut short still brings back what it measured.
set -u
cd "$(dirname "$0")/.."
B=.whl/gpu_compare.py; D=${GPU_CHECK_DIR:-/tmp/gc}; LOG=$D/log.txt
ARGS=(); TOKENS=256
if [ -n "${GPU_CHECK_TINY:-}" ]; then
  ARGS=(--tiny); TOKENS=16; B=${GPU_CHECK_COMPARE:-../shared/bench/gpu_compare.py}
fi
mkdir -p "$D"; : > "$LOG"
# the same runs through scale.py, named so in the summary
sed 's/"igrpo\.py"/"scale.py"/g; s/who="igrpo "/who="scale.py "/' "$B" > "$D/compare_scale.py"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
run() {  # one mode, its output kept; a failure is reported in the summary, the next mode still runs
  echo "== $*" | tee -a "$LOG"
  local script=$1 mode=$2 dir=$3; shift 3  # --tokens before --extra, which takes the rest
  timeout 240 python3 "$script" "$mode" "$dir" --tokens "$TOKENS" "$@" 2>&1 | grep -v "it/s\]" \
    | tee -a "$LOG" | tail -n 25
  [ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$LOG"
python3 "$B" build "$D" "${ARGS[@]}" | tee -a "$LOG"
S=$D/compare_scale.py
# each igrpo mode writes its own run-<algo>/ afresh, reads its metrics, then prints one RESULT line
run "$S" igrpo "$D" --project . --algo grpo
run "$B" igrpo "$D" --project . --algo grpo
run "$S" igrpo "$D" --project . --algo igrpo
run "$B" igrpo "$D" --project . --algo igrpo
python3 -c "import trl" 2>/dev/null && run "$B" trl "$D" || echo "== trl: not installed, skipped" | tee -a "$LOG"
run "$B" floor "$D"
echo "== summary" | tee -a "$LOG"
python3 - "$LOG" <<'PY' | tee -a "$LOG.summary"
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        r = json.loads(line[7:])
        keys = [k for k in ("median_after_first", "peak_gib", "generate_dynamic_cache",
                            "generate_static_cache", "update_fwd_bwd_adamw",
                            "generate_static_cache_error") if k in r]
        print(f"{r['who'][:70]:70s} " + "  ".join(f"{k}={r[k]}" for k in keys) + f"  [{r['device']}]")
PY
grep -h "compiled decoding for" "$LOG" | sort | uniq -c | head -n 20 | tee -a "$LOG.summary"
cat "$LOG.summary" >> "$LOG"; rm -f "$LOG.summary"
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"

echo "== tests (CUDA where there is one)" | tee -a "$LOG"
timeout 180 python3 -m pytest -q -x test_scale.py -k "static_cache or fixed_shape or compile \
  or blockwise or lean or master" 2>&1 | tail -n 5 | tee -a "$LOG"
echo "== bench.py step (where the memory goes)" | tee -a "$LOG"
SHAPE=(--hidden 896 --layers 24 --vocab 151936 --completion 256)
[ -n "${GPU_CHECK_TINY:-}" ] && SHAPE=(--completion 16)
timeout 150 python3 bench.py step --algo grpo "${SHAPE[@]}" --prompts 8 --group-size 8 \
  --micro-batch-size 16 --steps 3 2>&1 | grep "^device\|^step" | tee -a "$LOG"
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"

echo "== FSDP2 on this one GPU: torchrun --nproc-per-node 1 scale.py" | tee -a "$LOG"
timeout 200 torchrun --nproc-per-node 1 scale.py --model "$D/model" --dataset "$D/train.jsonl" \
  --algo grpo --steps 4 --group-size 8 --prompts-per-step 8 --max-completion-tokens "$TOKENS" \
  --micro-batch-size 16 --chat-template off --lr 1e-6 --output-dir "$D/fsdp-grpo" --overwrite 2>&1 \
  | grep -v "it/s\]" | tail -n 15 | tee -a "$LOG"
python3 - "$D/fsdp-grpo/metrics.jsonl" <<'PY' 2>&1 | tee -a "$LOG"
import json, statistics, sys
steps = [json.loads(line)["step_seconds"] for line in open(sys.argv[1]) if '"reward"' in line]
print(f"FSDP2, world size 1: median step after the first {statistics.median(steps[1:]):.3f} s "
      f"(all: {[round(s, 3) for s in steps]})")
PY
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"
