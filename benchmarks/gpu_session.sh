#!/usr/bin/env bash
# One device call per part: the GPU checks and measurements of a session, each part sized to fit the
# device tool's 10-minute limit, everything written under $OUT (the checkout's .data/wt2-word must be
# carried for the wt2 part). Usage: bash benchmarks/gpu_session.sh kernel|train|wt2
#   kernel  GPU tests of the kernels (pointer and tensor-descriptor forward) and of the HF interop,
#           then benchmarks/attention_quick.py with the per-kernel profile        (~8 min)
#   train   benchmarks/train.py, GPT-2-small positions and the short-vs-long claim, with profiles (~7 min)
#   wt2     the WikiText-2 runs missing from RESULTS.md, then benchmarks/eval_memory.py       (~8 min)
#   tma     the host time per attention call (benchmarks/launch_overhead.py), the GPU tests with
#           tensor-descriptor loads in every kernel, attention_quick again, and eager ALiBi vs none
#           training with profiles                                                       (~7 min)
# The device tool returns at most a few files per call, so each part ends by packing $OUT into one
# archive beside the logs.
set -u
export PYTHONPATH=src
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv \
    > "$OUT/gpu-$1.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu-$1.txt"

case "$1" in
kernel)
    # one pinned config per kernel: dozens of (dtype, head dim, flag) variants compile here
    ALIBI_TRITON_AUTOTUNE=0 ALIBI_KERNEL_REPORT="$OUT/kernel_errors.jsonl" timeout 270 \
        python -m pytest -p no:cacheprovider -q -m gpu tests/kernels tests/test_hf.py --durations=5 \
        > "$OUT/gpu_tests.txt" 2>&1
    tail -4 "$OUT/gpu_tests.txt"
    ALIBI_TRITON_AUTOTUNE=0 ALIBI_TRITON_TMA=1 ALIBI_KERNEL_REPORT="$OUT/kernel_errors_tma.jsonl" timeout 120 \
        python -m pytest -p no:cacheprovider -q tests/kernels/test_triton_attention.py \
        -k "gpu_matches or gpu_long_offset or tensor_descriptor" > "$OUT/gpu_tests_tma.txt" 2>&1
    tail -3 "$OUT/gpu_tests_tma.txt"
    timeout 190 python benchmarks/attention_quick.py --out "$OUT/kq" --profile > "$OUT/kq.log" 2>&1
    tail -12 "$OUT/kq.log"
    ;;
train)
    timeout 540 python benchmarks/train.py --out "$OUT/tb" --suite gpt2,short \
        --positions alibi,none,sinusoidal,rotary --profile 5 > "$OUT/tb.log" 2>&1
    tail -25 "$OUT/tb.log"
    ;;
wt2)
    python benchmarks/reproduce_wt2.py --data .data/wt2-word --out "$OUT/equal-budget" --work-dir /tmp/wt2 \
        --positions none,alibi-256 --steps 1600 --max-minutes 1.5 --eval-minutes 0.4 --total-minutes 4.2 \
        --no-progress > "$OUT/wt2-equal.log" 2>&1
    grep '^==' "$OUT/wt2-equal.log" | tail -4
    python benchmarks/reproduce_wt2.py --data .data/wt2-word --out "$OUT/longer" --work-dir /tmp/wt2l \
        --positions alibi,sinusoidal --steps 2800 --max-minutes 1.7 --eval-minutes 0.4 --total-minutes 4.2 \
        --no-progress > "$OUT/wt2-longer.log" 2>&1
    grep '^==' "$OUT/wt2-longer.log" | tail -4
    timeout 80 python benchmarks/eval_memory.py --out "$OUT/em" > "$OUT/em.log" 2>&1
    tail -12 "$OUT/em.log"
    ;;
tma)
    timeout 90 python benchmarks/launch_overhead.py --out "$OUT/lo" > "$OUT/lo.log" 2>&1
    head -8 "$OUT/lo.log"
    ALIBI_TRITON_AUTOTUNE=0 ALIBI_TRITON_TMA=1 ALIBI_KERNEL_REPORT="$OUT/kernel_errors_tma.jsonl" timeout 220 \
        python -m pytest -p no:cacheprovider -q -m gpu tests/kernels > "$OUT/gpu_tests_tma.txt" 2>&1
    ALIBI_TRITON_AUTOTUNE=0 timeout 60 python -m pytest -p no:cacheprovider -q tests/kernels/test_triton_attention.py \
        -k tensor_descriptor >> "$OUT/gpu_tests_tma.txt" 2>&1
    grep -cE "^(\.|F|E)" "$OUT/gpu_tests_tma.txt"; grep -E "FAIL|Error" "$OUT/gpu_tests_tma.txt" | head -5
    timeout 150 python benchmarks/attention_quick.py --out "$OUT/kq" --profile > "$OUT/kq.log" 2>&1
    grep -A8 "^| D |" "$OUT/kq/attention-quick.md"
    timeout 120 python benchmarks/train.py --out "$OUT/tb-eager" --suite gpt2 --positions alibi,none --no-compile \
        --profile 3 > "$OUT/tb-eager.log" 2>&1
    grep -E "tokens/s|^wall" "$OUT/tb-eager.log"
    ;;
*)
    echo "usage: $0 kernel|train|wt2" >&2
    exit 2
    ;;
esac
(cd "$OUT" && tar czf "../session-$1.tgz" . && mv "../session-$1.tgz" .)
