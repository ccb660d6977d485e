#!/usr/bin/env bash
# GPU performance, round 2 (issue 12): the checks and A/Bs of benchmarks/RESULTS.md, one part per device call
# (a device call runs at most 10 minutes; each part is sized to fit). Run from the repository root on the GPU:
#
#   bash benchmarks/gpu_round2.sh check     # cuDNN custom calls in the compiled 1B step; cudnn vs xla losses
#   bash benchmarks/gpu_round2.sh attn      # 1B: packed (default) | one document per row | dense mask
#   bash benchmarks/gpu_round2.sh xla       # 1B: config.xla options on, memory fraction .95, unrolled layers
#   bash benchmarks/gpu_round2.sh remat     # 1B: remat none | minimal_with_context | full (dry runs first)
#   bash benchmarks/gpu_round2.sh profile   # 1B: trace of steps 5-6 and its GEMM/attention/other breakdown
#   bash benchmarks/gpu_round2.sh 7b        # 7B on one H200: dry run, benchmark, bf16 moments
#
# Everything is appended to $OUT/round2.log (and benchmark lines to $OUT/bench/benchmark.jsonl). Extra arguments
# after the part go to every llm_jax command (e.g. --config.data.global_batch_size=16).
set -uo pipefail
OUT=${OUT:-/tmp/round2}; mkdir -p "$OUT"
part=${1:-attn}; shift || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/round2.log"; }
step() { log "$*"; timeout "${STEP_S:-300}" "$@" 2>&1 | grep -v '^WARNING' | tail -n 30 | tee -a "$OUT/round2.log"; }
B1="python3 -m llm_jax.benchmark --config=experiments/1b.py --steps=20 --warmup=3 --workdir=$OUT/bench"
XLA_ON='--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/round2.log"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/round2.log"
case "$part" in
  check)
    # Which cuDNN attention calls the compiled step holds: fmhaSoftmax (one-run and packed branches, no bias) and
    # fmhaScaleBiasSoftmax (the dense fallback branch). The profile shows which one ran.
    step python3 -m llm_jax.main --config=experiments/1b.py --dry_run "--config.xla.options=--xla_dump_to=$OUT/hlo" "$@"
    grep -ho 'custom_call_target="__cudnn$fmha[A-Za-z]*"' "$OUT"/hlo/*after_optimizations.txt | sort | uniq -c \
      | tee -a "$OUT/round2.log"
    # Losses of the cuDNN kernels vs the xla reference on packed synthetic batches (~3 documents a row), 125M.
    for kernel in cudnn xla; do
      step python3 -m llm_jax.main --config=experiments/125m.py --workdir="$OUT/loss_$kernel" \
        --config.model.attention=$kernel --config.train.steps=8 --config.train.log_every=1 \
        --config.data.global_batch_size=8 --config.eval.steps=1 --config.checkpoint.every=0 "$@"
    done
    python3 - "$OUT" <<'EOF' | tee -a "$OUT/round2.log"
import json, sys
rows = {k: [json.loads(l) for l in open(f'{sys.argv[1]}/loss_{k}/metrics.jsonl') if '"loss"' in l] for k in ('cudnn', 'xla')}
for a, b in zip(rows['cudnn'], rows['xla']):
  print(f"step {a['step']}: cudnn {a['loss']:.5f} xla {b['loss']:.5f} rel {abs(a['loss'] - b['loss']) / b['loss']:.2e}")
EOF
    ;;
  attn)
    step $B1 "$@"                                                 # packed layout (synthetic rows hold ~3 documents)
    step $B1 --one_document "$@"                                  # plain causal, as the peer
    step $B1 --config.model.max_segments_per_row=0 "$@"           # the dense mask (before this issue)
    ;;
  xla)
    step $B1 --one_document "--config.xla.options=$XLA_ON" "$@"
    step $B1 --one_document --config.xla.gpu_memory_fraction=0.95 "$@"
    step $B1 --one_document --config.model.scan_layers=false "$@"
    ;;
  remat)
    for r in none minimal_with_context full; do
      step python3 -m llm_jax.main --config=experiments/1b.py --dry_run --config.model.remat=$r "$@"
    done
    step $B1 --one_document --config.model.remat=minimal_with_context "$@"
    step $B1 --one_document --config.model.remat=full "$@"
    ;;
  profile)
    step $B1 --one_document --steps=3 --config.train.profile_steps=5,6 "$@"
    step python3 benchmarks/trace_summary.py "$OUT/bench/profile"
    ;;
  7b)
    B7="python3 -m llm_jax.benchmark --config=experiments/7b.py --steps=10 --warmup=2 --workdir=$OUT/bench --one_document"
    step python3 -m llm_jax.main --config=experiments/7b.py --dry_run "$@"
    step $B7 --config.xla.gpu_memory_fraction=0.95 "$@"
    step $B7 --config.xla.gpu_memory_fraction=0.95 --config.train.moments_dtype=bfloat16 "$@"
    ;;
  *) echo "usage: $0 check|attn|xla|remat|profile|7b [llm_jax overrides...]"; exit 2 ;;
esac
log "done ($part)"
