"""Quick training-kernel measurement (issue 5): our causal ALiBi kernel against SDPA without bias.

One call on the device machine, under ~150 s with Triton compilation: causal, bf16, D=128 (H=16)
and D=64 (H=32), L=2048 and 8192, B=16384/L. For each shape: forward and forward+backward TFLOP/s
of ours (paper slopes) and of SDPA without bias (medians of triton.testing.do_bench, random inputs;
causal FLOPs 2*B*H*L^2*D forward, backward 2.5x that, as in benchmarks/attention.py), plus two
checks of the very kernels timed: ours with all slopes zero against SDPA's output, and ours with
the slopes against an fp32 reference on two heads of the first sequence. Last, one small shape with
gradients (trainable slopes included) against the float64 reference. Flex is left out (its compile
alone would blow the time budget); the full table in BENCHMARKS.md has it.

    PYTHONPATH=src python3 benchmarks/attention_quick.py --out OUT_DIR
    PYTHONPATH=src python3 benchmarks/attention_quick.py --out /tmp/kq --cpu-smoke   # interpreter, tiny

With --profile, one forward+backward of each method per shape also runs under torch.profiler, and the
markdown lists the time of every kernel (our forward, dK/dV, dQ and delta kernels against SDPA's).

writes OUT_DIR/attention-quick.json and .md (rewritten after every shape) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

TOKENS = 16_384


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the JSON and markdown results")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    p.add_argument("--profile", action="store_true",
                   help="also profile one forward+backward of ours and of SDPA per shape: time per kernel")
    return p.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import triton_attention as ta  # noqa: E402
from alibi_lm.kernels.reference import attention_reference  # noqa: E402
from alibi_lm.kernels.triton_flash import flash_kernels  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import breakdown, median_ms  # noqa: E402
from kernel_profile import markdown as profile_markdown  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"
DTYPE = torch.bfloat16
T0 = time.time()


def _log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _median_ms(fn, grad_to_none=None) -> float:
    return median_ms(fn, smoke=ARGS.cpu_smoke, grad_to_none=grad_to_none)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _ref_fp32(q, k, v, slopes) -> torch.Tensor:
    """fp32 causal ALiBi attention of (H, L, D) inputs, one head at a time (no L^2 x H buffer)."""
    L, D = q.shape[-2], q.shape[-1]
    pos = torch.arange(L, device=q.device, dtype=torch.float32)
    dist = pos[:, None] - pos[None, :]
    outs = []
    for h in range(q.shape[0]):
        s = (q[h].float() @ k[h].float().T) * D**-0.5 - slopes[h].float() * dist
        s = s.masked_fill(dist < 0, float("-inf"))
        outs.append(torch.softmax(s, dim=-1) @ v[h].float())
    return torch.stack(outs)


# The forward kernel's pointer loads instead of its tensor-descriptor (TMA) loads, the comparison of
# BENCHMARKS.md (on GPUs before sm_90 both are the pointer path).
POINTER = dataclasses.replace(ta.KernelOptions.from_env(), tma=False)


def bench_shape(D: int, L: int) -> dict:
    H, B = 2048 // D, max(1, TOKENS // L)
    if ARGS.cpu_smoke:
        H, B = 2, 1
    torch.manual_seed(D * 100_003 + L)
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=DTYPE, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    slopes = alibi_slopes(H).to(DEV, torch.float32)
    flops = 2 * B * H * L * L * D
    row: dict = {"D": D, "L": L, "H": H, "B": B}
    methods = {"ours": lambda: ta.triton_attention(q, k, v, slopes=slopes, causal=True),
               "ours_pointer": lambda: ta.triton_attention(q, k, v, slopes=slopes, causal=True, options=POINTER),
               "sdpa_no_bias": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, fn in methods.items():
        try:
            with torch.no_grad():
                fwd = _median_ms(fn)

            def step(fn=fn):
                fn().backward(do)

            step()  # autotune / compile the backward outside the timing
            both = _median_ms(step, grad_to_none=[q, k, v])
            row[name] = {"fwd_ms": fwd, "fwdbwd_ms": both, "fwd_tflops": flops / fwd / 1e9,
                         "fwdbwd_tflops": 3.5 * flops / both / 1e9}
            if ARGS.profile:
                row[name]["profile"] = breakdown(step, 1 if ARGS.cpu_smoke else 10, top=6)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other shapes still run
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        q.grad = k.grad = v.grad = None
        _log(f"D={D} L={L} {name}: {row[name]}")
    if not ARGS.cpu_smoke:
        kernels = flash_kernels(D)
        row["configs"] = {n: str(getattr(kernel.autotuner, "best_config", None))
                          for n, kernel in zip(("_fwd", "_dkdv", "_dq"), kernels, strict=True)}
        row["configs"]["_fwd (all)"] = {str(key): str(cfg) for key, cfg in kernels.forward.autotuner.cache.items()}
    with torch.no_grad():
        # the timed kernels themselves (same compiled variants: HAS_SLOPES, causal) on the timed shapes
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        zero = ta.triton_attention(q, k, v, slopes=torch.zeros_like(slopes), causal=True)
        row["check_zero_slopes_vs_sdpa"] = {"rel": _rel(zero, sdpa), "max_abs": (zero - sdpa).abs().max().item()}
        zero = ta.triton_attention(q, k, v, slopes=torch.zeros_like(slopes), causal=True, options=POINTER)
        row["check_pointer_zero_slopes_vs_sdpa"] = {"rel": _rel(zero, sdpa),
                                                     "max_abs": (zero - sdpa).abs().max().item()}
        ours = ta.triton_attention(q, k, v, slopes=slopes, causal=True)
        heads = [0, H - 1]  # steepest and flattest slope
        ref = _ref_fp32(q[0, heads], k[0, heads], v[0, heads], slopes[heads])
        got = ours[0, heads].float()
        row["check_slopes_vs_fp32"] = {"rel": _rel(got, ref), "max_abs": (got - ref).abs().max().item()}
        del sdpa, zero, ours, ref, got
    for key in ("check_zero_slopes_vs_sdpa", "check_pointer_zero_slopes_vs_sdpa", "check_slopes_vs_fp32"):
        row[key]["ok"] = bool(row[key]["rel"] < 1e-2)
    del methods  # the inputs go with the closures when this returns
    return row


def grad_check() -> dict:
    """Forward and every gradient (q, k, v, trainable slopes) of a small ragged shape vs float64."""
    B, H, L, D = 2, 4, 300, 64 if ARGS.cpu_smoke else 128
    if ARGS.cpu_smoke:
        L = 70
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=DTYPE, requires_grad=True) for _ in range(3))
    slopes = alibi_slopes(H).to(DEV, torch.float32).requires_grad_(True)
    do = torch.randn_like(q)
    out = ta.triton_attention(q, k, v, slopes=slopes, causal=True)
    out.backward(do)
    got = [out.detach(), q.grad, k.grad, v.grad, slopes.grad]
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, slopes)]
    ref = attention_reference(*leaves[:3], slopes=leaves[3], causal=True)
    ref.backward(do.double())
    want = [ref.detach()] + [t.grad for t in leaves]
    res = {}
    for name, g, w in zip(("out", "dq", "dk", "dv", "dslopes"), got, want):
        rel = _rel(g, w)
        # bf16 operands: ~4e-3 expected; dslopes sums ~L^2 products of distances with ds
        res[name] = {"rel": rel, "max_abs": (g.double() - w).abs().max().item(), "ok": bool(rel < 2e-2)}
    return {"shape": dict(B=B, H=H, L=L, D=D), **res}


def table(rows: list[dict]) -> str:
    out = ["TFLOP/s fwd / fwd+bwd, causal bf16, ours with ALiBi slopes; ratio = ours / SDPA no bias; ours_pointer = "
           "the forward kernel with pointer loads instead of tensor descriptors",
           "", "| D | L | ours | ours_pointer | sdpa_no_bias | fwd ratio | fwd+bwd ratio | check vs SDPA (0 slopes) "
           "| same, ours_pointer | check vs fp32 |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        return f"{r['fwd_tflops']:.0f} / {r['fwdbwd_tflops']:.0f}" if "fwd_tflops" in r else r.get("error", "-")

    for r in rows:
        a, b = r.get("ours", {}), r.get("sdpa_no_bias", {})
        ok = "fwd_tflops" in a and "fwd_tflops" in b
        fr = f"{a['fwd_tflops'] / b['fwd_tflops']:.2f}x" if ok else "-"
        br = f"{a['fwdbwd_tflops'] / b['fwdbwd_tflops']:.2f}x" if ok else "-"
        checks = " | ".join(f"rel {c['rel']:.1e} {'ok' if c['ok'] else 'FAIL'}" for c in (
            r["check_zero_slopes_vs_sdpa"], r["check_pointer_zero_slopes_vs_sdpa"], r["check_slopes_vs_fp32"]))
        out.append(f"| {r['D']} | {r['L']} | {cell(a)} | {cell(r.get('ours_pointer', {}))} | {cell(b)} | {fr} | {br} "
                   f"| {checks} |")
    for r in rows:
        for name in ("ours", "ours_pointer", "sdpa_no_bias"):
            if "profile" in r.get(name, {}):
                title = f"{name}, D={r['D']} L={r['L']} H={r['H']} B={r['B']}: one forward+backward"
                out += ["", profile_markdown(title, r[name]["profile"]).rstrip()]
    return "\n".join(out)


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    result: dict = {"meta": meta, "rows": [], "grad_check": None}

    def save() -> None:
        # rewritten after every shape: a run cut short still leaves what it measured
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        md = f"{header}\n\n{table(result['rows'])}\n"
        if result["grad_check"]:
            g = result["grad_check"]
            md += ("\nGradient check vs float64 " + json.dumps(g["shape"]) + ": " + ", ".join(
                f"{n} rel {g[n]['rel']:.1e} {'ok' if g[n]['ok'] else 'FAIL'}"
                for n in ("out", "dq", "dk", "dv", "dslopes")) + "\n")
        (ARGS.out / "attention-quick.json").write_text(json.dumps(result, indent=1))
        (ARGS.out / "attention-quick.md").write_text(md)
        return md

    shapes = [(64, 64)] if ARGS.cpu_smoke else [(128, 2048), (128, 8192), (64, 2048), (64, 8192)]
    for D, L in shapes:
        result["rows"].append(bench_shape(D, L))
        if not ARGS.cpu_smoke:
            torch.cuda.empty_cache()
        save()
    _log("grad check")
    result["grad_check"] = grad_check()
    md = save()
    result["meta"]["seconds"] = round(time.time() - T0, 1)
    save()
    print("\n" + md, flush=True)
    _log("done")


if __name__ == "__main__":
    main()
