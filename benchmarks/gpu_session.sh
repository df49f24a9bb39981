#!/usr/bin/env bash
# One device call per part: the GPU checks and measurements of a session, each part sized to fit the
# device tool's 10-minute limit, everything written under $OUT (the wt2 part needs the checkout's
# .data/wt2-word carried along). Usage: bash benchmarks/gpu_session.sh kernel|peers|train|study|wt2
#   kernel  GPU tests of the kernels (descriptor forward, the default; then the pointer forward and the
#           descriptor-vs-pointer forward tests) and of the HF interop, then
#           benchmarks/attention_quick.py with the per-kernel profile of every variant     (~9 min)
#   peers   benchmarks/attention.py: the full table against SDPA, SDPA + mask, Flex and BLOOM,
#           training shapes and decoding                                                   (~5 min)
#   train   benchmarks/launch_overhead.py (host time per attention call, with the Python profile of
#           the launch path), then benchmarks/train.py: GPT-2-small positions and the short-vs-long
#           claim, with profiles, in the default compile mode and with CUDA graphs     (~7 min)
#   study   benchmarks/launch_overhead.py (host time per call, Python profile of the launch path), then
#           benchmarks/backward_study.py: our backward kernels over a config sweep with their
#           registers and spills, against Flex's backward, compiled sources kept      (~6 min)
#   wt2     the WikiText-2 results whose JSON files were lost in a device reply (RESULTS.md has their
#           numbers from the logs): `none` at equal budget, alibi and sinusoidal with the 2800-step
#           schedule and early stopping, so that every plot has every run               (~7 min)
# The device tool returns at most eight files per call, so each part ends by packing $OUT into one
# archive; the last lines of each step's log are printed for the call's reply.
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
    ALIBI_TRITON_AUTOTUNE=0 ALIBI_KERNEL_REPORT="$OUT/kernel_errors.jsonl" timeout 200 \
        python -m pytest -p no:cacheprovider -q -m gpu tests/kernels tests/hf --durations=5 \
        > "$OUT/gpu_tests.txt" 2>&1
    grep -E "^[.FEsx]+ +\[" "$OUT/gpu_tests.txt"; grep -E "FAILED|Error" "$OUT/gpu_tests.txt" | head -5
    ALIBI_TRITON_AUTOTUNE=0 ALIBI_TRITON_TMA=0 ALIBI_KERNEL_REPORT="$OUT/kernel_errors_pointer.jsonl" timeout 90 \
        python -m pytest -p no:cacheprovider -q tests/kernels/test_triton_attention.py \
        -k "gpu_matches or gpu_long_offset or tensor_descriptor" > "$OUT/gpu_tests_pointer.txt" 2>&1
    grep -E "^[.FEsx]+ +\[" "$OUT/gpu_tests_pointer.txt"; grep -E "FAILED|Error" "$OUT/gpu_tests_pointer.txt" | head -5
    timeout 180 python benchmarks/attention_quick.py --out "$OUT/kq" --profile > "$OUT/kq.log" 2>&1
    grep -A8 "^| D |" "$OUT/kq/attention-quick.md"
    ;;
peers)
    timeout 560 python benchmarks/attention.py "$OUT/peers" --part all > "$OUT/peers.log" 2>&1
    tail -30 "$OUT/peers.log"
    ;;
train)
    timeout 90 python benchmarks/launch_overhead.py --out "$OUT/lo" > "$OUT/lo.log" 2>&1
    head -8 "$OUT/lo.log"
    timeout 250 python benchmarks/train.py --out "$OUT/tb" --suite gpt2,short \
        --positions alibi,none,sinusoidal,rotary --profile 3 > "$OUT/tb.log" 2>&1
    grep -A12 "^| suite" "$OUT/tb/train_bench.md"; grep -E "^#### |^wall" "$OUT/tb/train_bench.md"
    timeout 230 python benchmarks/train.py --out "$OUT/tb-graphs" --suite gpt2,short --positions alibi,none \
        --compile-mode reduce-overhead --profile 3 > "$OUT/tb-graphs.log" 2>&1
    grep -A10 "^| suite" "$OUT/tb-graphs/train_bench.md"; grep -E "^#### |^wall" "$OUT/tb-graphs/train_bench.md"
    tail -3 "$OUT/tb-graphs.log"
    ;;
study)
    timeout 90 python benchmarks/launch_overhead.py --out "$OUT/lo" > "$OUT/lo.log" 2>&1
    head -14 "$OUT/lo.log"
    timeout 420 python benchmarks/backward_study.py --out "$OUT/bs" > "$OUT/bs.log" 2>&1
    head -80 "$OUT/bs/backward-study.md"; tail -3 "$OUT/bs.log"
    # the reply takes 16 MiB a file: keep the compiled kernels' TTGIR, PTX and metadata, Inductor's code
    find "$OUT/bs/triton-cache" -type f ! -name "*.ttgir" ! -name "*.ptx" ! -name "*.json" -delete
    find "$OUT/bs/inductor-cache" -type f ! -name "*.py" -delete
    ;;
wt2)
    # results JSON lost in the device's replies of 2026-11-25 (the runs' logs are in results/wt2/)
    python benchmarks/reproduce_wt2.py --data .data/wt2-word --out "$OUT/equal-budget" --work-dir /tmp/wt2 \
        --positions none --steps 1600 --max-minutes 1.5 --eval-minutes 0.4 --total-minutes 2.0 \
        --no-progress > "$OUT/wt2-equal.log" 2>&1
    grep '^==' "$OUT/wt2-equal.log" | tail -2
    python benchmarks/reproduce_wt2.py --data .data/wt2-word --out "$OUT/longer" --work-dir /tmp/wt2l \
        --positions alibi,sinusoidal --steps 2800 --max-minutes 1.9 --eval-minutes 0.5 --total-minutes 4.6 \
        --no-progress > "$OUT/wt2-longer.log" 2>&1
    grep '^==' "$OUT/wt2-longer.log" | tail -4
    ;;
*)
    echo "usage: $0 kernel|peers|train|study|wt2" >&2
    exit 2
    ;;
esac
# the archive alone comes back: the device tool returns at most eight files per call
(cd "$OUT" && tar czf "../session-$1.tgz" . && find . -mindepth 1 -delete && mv "../session-$1.tgz" .)
