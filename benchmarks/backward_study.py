"""Backward-kernel study (issue 5): our dK/dV and dQ kernels config by config, against Flex's backward.

On the H100 (2026-11-25 evening, D = 128, L = 8192) our backward took 5.2 ms where Flex's Triton
backward, with the same block shapes, warps and stages and the same seven matrix products per tile
pair, took about 3.7 ms (fwd+bwd 6.48 against 5.22 ms, forward 1.28 against 1.52 ms). This script
found where that difference lived: the TTGIR it keeps showed our main loops unpipelined, behind a
run-time branch on the head dim (fixed the same night; benchmarks/NOTES-kernel.md has both runs).
For each head dim (bf16, causal, the paper's slopes):

  sweep    each of our backward kernels over a wide list of (BLOCK_M, BLOCK_N, warps, stages), the
           other kernel held at its default: the backward's median time (do_bench) and each kernel's
           own time (torch.profiler)
  no bias  the default configs again with slopes=None: what the bias costs inside the backward
  flex     torch.profiler over Flex's compiled fwd+bwd (ALiBi score_mod, causal block mask): its
           kernels' times, next to ours through the autotuner

Every Triton kernel compiled by the run (ours and Flex's) is kept with its TTGIR and PTX under
OUT/triton-cache, and Inductor's generated code under OUT/inductor-cache, so the two can be diffed
offline. The resource report (registers, spills, shared memory of every compiled binary, ours and
Flex's, by name) reads them from the loaded binaries.

    PYTHONPATH=src python benchmarks/backward_study.py --out OUT
    PYTHONPATH=src python benchmarks/backward_study.py --out OUT --cpu-smoke   # interpreter, tiny; checks the script

writes OUT/backward-study.json and .md (rewritten after every head dim) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the results and the compiled kernels")
    p.add_argument("--dims", default="128,64", help="head dims, comma-separated (default 128,64)")
    p.add_argument("--length", type=int, default=8192, help="sequence length (default 8192; B = 16384 / L)")
    p.add_argument("--no-flex", action="store_true", help="leave out Flex (its compile takes ~1 min)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    return p.parse_args()


ARGS = _parse()
ARGS.out.mkdir(parents=True, exist_ok=True)
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported
# both compilers write where the results go, so their sources come back with them
os.environ.setdefault("TRITON_CACHE_DIR", str(ARGS.out / "triton-cache"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ARGS.out / "inductor-cache"))

import torch  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import triton_attention as ta  # noqa: E402
from alibi_lm.kernels.triton_flash import flash_backward, flash_forward_with_lse, flash_kernels  # noqa: E402
from alibi_lm.positions import alibi_slopes  # noqa: E402
from kernel_profile import breakdown, median_ms  # noqa: E402

DEV = "cpu" if ARGS.cpu_smoke else "cuda"
DTYPE = torch.bfloat16
TOKENS = 16_384
T0 = time.time()
OPTIONS = ta.KernelOptions.from_env()  # the launchers' options, the environment's as in triton_attention

# (BLOCK_M, BLOCK_N, warps, stages). dK/dV keeps BLOCK_N keys resident and streams BLOCK_M queries,
# dQ the reverse; the lists span the Triton tutorial's (32/128, 4 warps, deep pipelines) and Flex's
# Hopper defaults (64x128 and 128x64, 8 warps, 3 stages) and what our autotuner has picked.
DKDV_SWEEP = [(32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 4, 5), (64, 128, 8, 2), (64, 128, 8, 3),
              (64, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 4, 3)]
DQ_SWEEP = [(128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5), (128, 64, 8, 2), (128, 64, 8, 3),
            (128, 64, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2), (64, 32, 4, 3), (128, 64, 4, 3)]
if ARGS.cpu_smoke:  # the interpreter pays per block: two small configs each, BLOCK_M != BLOCK_N
    DKDV_SWEEP = [(16, 32, 4, 1), (32, 16, 4, 1)]
    DQ_SWEEP = [(32, 16, 4, 1), (16, 32, 4, 1)]


def _log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _median_ms(fn) -> float:
    return median_ms(fn, smoke=ARGS.cpu_smoke)


def _pinned(kernel, config: tuple[int, int, int, int]):
    """Until the block ends, the kernel (a `TunedKernel` of `flash_kernels`) launches this one config,
    without benchmarking."""
    m, n, w, s = config
    return kernel.pinned(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s))


def _kernel_ms(profile: dict, fragment: str) -> float | None:
    hits = [k["ms_per_call"] for k in profile["top_kernels"] if fragment in k["name"]]
    return sum(hits) if hits else None


def _inputs(D: int, L: int):
    B, H = max(1, TOKENS // L), max(1, 2048 // D)
    if ARGS.cpu_smoke:
        B, H = 1, 2
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device=DEV, dtype=DTYPE) for _ in range(4))
    slopes = alibi_slopes(H).to(DEV, torch.float32)
    return q, k, v, do, slopes


def sweep_head_dim(D: int, L: int) -> dict:
    q, k, v, do, slopes = _inputs(D, L)
    scale = D**-0.5
    o, lse = flash_forward_with_lse(q, k, v, slopes, True, 0, scale, options=OPTIONS)
    bwd_flops = 2.5 * 2 * q.shape[0] * q.shape[1] * L * L * D

    def backward(sl=slopes):
        return flash_backward(do, q, k, v, o, lse, sl, True, 0, scale, False, options=OPTIONS)

    reference = backward()  # the default configs' gradients: every config must give the same ones
    kernels = {"_dkdv": flash_kernels(D).dkdv, "_dq": flash_kernels(D).dq}
    defaults = {"_dkdv": DKDV_SWEEP[0], "_dq": DQ_SWEEP[0]}
    result = {"D": D, "L": L, "B": q.shape[0], "H": q.shape[1], "sweeps": {}}
    for name, sweep, other in (("_dkdv", DKDV_SWEEP, "_dq"), ("_dq", DQ_SWEEP, "_dkdv")):
        rows = []
        with _pinned(kernels[other], defaults[other]):
            for config in sweep:
                row = {"config": list(config)}
                try:
                    with _pinned(kernels[name], config):
                        grads = backward()
                        row["max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                                  for a, b in zip(grads[:3], reference[:3], strict=True))
                        row["backward_ms"] = _median_ms(backward)
                        row["backward_tflops"] = bwd_flops / row["backward_ms"] / 1e9
                        prof = breakdown(backward, 3 if ARGS.cpu_smoke else 5, top=8)
                    row["kernel_ms"] = _kernel_ms(prof, f"{name}_kernel")
                except Exception as exc:  # a config that does not fit (shared memory, registers) is reported
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                _log(f"D={D} {name} {config}: {row}")
        result["sweeps"][name] = rows

    with _pinned(kernels["_dkdv"], defaults["_dkdv"]), _pinned(kernels["_dq"], defaults["_dq"]):
        with_bias, without = _median_ms(backward), _median_ms(lambda: backward(None))
    result["bias_cost"] = {"configs": defaults, "with_slopes_ms": with_bias, "without_slopes_ms": without}
    return result


def profile_fwd_bwd(D: int, L: int) -> dict:
    """torch.profiler over fwd+bwd: ours through the autotuner, and Flex's compiled kernels."""
    q, k, v, do, slopes = _inputs(D, L)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    methods = {"ours": lambda: ta.triton_attention(q, k, v, slopes=slopes, causal=True)}
    if not (ARGS.cpu_smoke or ARGS.no_flex):
        from torch.nn.attention.flex_attention import create_block_mask

        from attention import _flex_alibi  # the all-peers table's Flex: compiled, ALiBi score_mod

        flex, alibi = _flex_alibi(slopes)
        mask = create_block_mask(lambda b, h, qi, kj: qi >= kj, None, None, L, L, device=q.device)
        methods["flex_alibi"] = lambda: flex(q, k, v, score_mod=alibi, block_mask=mask)
        methods["flex_no_bias"] = lambda: flex(q, k, v, block_mask=mask)
    out = {}
    for name, fn in methods.items():
        def step(fn=fn):
            fn().backward(do)
            q.grad = k.grad = v.grad = None

        try:
            step()
            out[name] = {"fwdbwd_ms": _median_ms(step), "profile": breakdown(step, 3 if ARGS.cpu_smoke else 5)}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        _log(f"D={D} profile {name}: {out[name].get('fwdbwd_ms', out[name].get('error'))}")
    return out


def cached_binaries() -> list[dict]:
    """Registers and spills of every binary in the Triton cache (ours and Flex's), read by loading it."""
    rows = []
    if ARGS.cpu_smoke:
        return rows
    load = triton.runtime.driver.active.utils.load_binary
    for meta_path in Path(os.environ["TRITON_CACHE_DIR"]).glob("*/*.json"):
        cubin = meta_path.with_suffix(".cubin")
        if not cubin.exists():
            continue
        meta = json.loads(meta_path.read_text())
        row = {"name": meta.get("name"), "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
               "shared": meta.get("shared"), "dir": meta_path.parent.name}
        try:
            _, _, row["n_regs"], row["n_spills"], _ = load(meta["name"], cubin.read_bytes(), meta["shared"],
                                                             torch.cuda.current_device())
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:160]
        rows.append(row)
    return rows


def markdown(results: list[dict]) -> str:
    lines = ["# Backward study", ""]
    for r in results:
        lines += [f"## D = {r['D']}, L = {r['L']} (B = {r['B']}, H = {r['H']})", ""]
        for name, rows in r["sweeps"].items():
            lines += [f"`{name}` swept, the other kernel at its default", "",
                      "| BLOCK_M, BLOCK_N, warps, stages | backward ms | TFLOP/s | kernel ms | max diff |",
                      "|---|---:|---:|---:|---:|"]
            for row in rows:
                if "error" in row:
                    lines.append(f"| {row['config']} | {row['error']} | | | |")
                    continue
                kernel = "" if row["kernel_ms"] is None else f"{row['kernel_ms']:.3f}"
                lines.append(f"| {row['config']} | {row['backward_ms']:.3f} | {row['backward_tflops']:.0f} | "
                             f"{kernel} | {row['max_abs_diff']:.1e} |")
            lines.append("")
        bc = r["bias_cost"]
        lines += [f"bias: backward {bc['with_slopes_ms']:.3f} ms with slopes, {bc['without_slopes_ms']:.3f} without",
                  ""]
        for name, p in r.get("profiles", {}).items():
            if "error" in p:
                lines.append(f"- {name}: {p['error']}")
                continue
            kernels = ", ".join(f"`{k['name'][:60]}` {k['ms_per_call']:.3f}" for k in p["profile"]["top_kernels"][:5])
            lines.append(f"- {name}: fwd+bwd {p['fwdbwd_ms']:.3f} ms; {kernels}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    dims = [int(d) for d in ARGS.dims.split(",")]
    L = 64 if ARGS.cpu_smoke else ARGS.length
    if ARGS.cpu_smoke:
        dims = [16]
    results = []
    for D in dims:
        r = sweep_head_dim(D, L)
        r["profiles"] = profile_fwd_bwd(D, L)
        results.append(r)
        payload = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
                   "torch": torch.__version__, "triton": triton.__version__, "results": results}
        (ARGS.out / "backward-study.json").write_text(json.dumps(payload, indent=1))
        (ARGS.out / "backward-study.md").write_text(markdown(results))
    binaries = cached_binaries()
    payload["binaries"] = binaries
    (ARGS.out / "backward-study.json").write_text(json.dumps(payload, indent=1))
    print(markdown(results))
    for row in sorted(binaries, key=lambda r: str(r.get("name"))):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
