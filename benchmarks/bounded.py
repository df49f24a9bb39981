"""Bounded-error ALiBi attention (issue 19) on a model's own q, k, v: speed, tiles read and error.

For every layer of a checkpoint the script runs the model over one long window of real tokens, takes
that layer's attention inputs (`Attention.project`, after any rotation) and times, side by side:

  dense          our Triton flash forward (tolerance 0)
  sdpa_no_bias   torch SDPA, causal, without any bias: the ceiling of plain attention
  bounded@tol    the bounded-error kernel (key-norm maxima computed in the call: their cost counts)

with the share of the dense key tiles each bounded call read and its largest error against the dense
output. Then decoding: one token over the layer's keys as a cache (batch 1 and --decode-batch), dense
split-K decoding against the bounded kernel with the cache's kept norm maxima. Random weights do not
show real norms: use a trained checkpoint (`alibi-lm train`, or `alibi-lm import` of a BLOOM).

    PYTHONPATH=src python benchmarks/bounded.py --checkpoint runs/wt2 --data data/wt2 --out OUT
    PYTHONPATH=src python benchmarks/bounded.py --out OUT --cpu-smoke   # random tiny model, interpreter

writes OUT/bounded.json and OUT/bounded.md (date, device, versions, command) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for bounded.json and bounded.md")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint or run directory (ALiBi)")
    p.add_argument("--data", default=None, help="its prepared data (default: the one it was trained on)")
    p.add_argument("--length", type=int, default=16384, help="window length of the forward (default: 16384)")
    p.add_argument("--tolerances", default="1e-2,1e-4,1e-6", help="comma-separated (default: 1e-2,1e-4,1e-6)")
    p.add_argument("--decode-batch", type=int, default=8, help="the larger decoding batch (default: 8)")
    p.add_argument("--cpu-smoke", action="store_true", help="a random 2-layer model, length 64, interpreter")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported

import torch  # noqa: E402
import triton  # noqa: E402

from alibi_lm.kernels import attention  # noqa: E402
from alibi_lm.kernels.triton_bounded import bounded_attention, key_norm_prefix_max  # noqa: E402
from alibi_lm.kernels.triton_decode import triton_decode  # noqa: E402
from alibi_lm.model import ModelConfig, TransformerLM  # noqa: E402
from kernel_profile import median_ms  # noqa: E402


def _ms(fn) -> float:
    return median_ms(fn, smoke=True) if ARGS.cpu_smoke else triton.testing.do_bench(fn)


def _model_and_tokens(device: torch.device) -> tuple[TransformerLM, torch.Tensor, str]:
    if ARGS.cpu_smoke:
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(vocab_size=256, n_layers=2, d_model=64, n_heads=4)).to(device).eval()
        return model, torch.randint(0, 256, (1, ARGS.length), device=device), "random tiny model"
    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.data import load_tokens
    from alibi_lm.evaluate import find_data_dir

    ckpt = load_checkpoint(ARGS.checkpoint, device=device)
    data = Path(ARGS.data) if ARGS.data else find_data_dir(ckpt)
    if data is None:
        sys.exit("pass --data: the checkpoint does not say which data it was trained on")
    tokens = torch.as_tensor(load_tokens(data, "test")[: ARGS.length].astype("int64"), device=device)[None]
    return ckpt.model, tokens, str(ckpt.path)


@torch.no_grad()
def _layer_inputs(model: TransformerLM, tokens: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, slopes) of every layer for the window, in bf16, as the kernels would get them."""
    x = model.dropout(model.position.embed(model.embed(tokens), 0))
    if model.embed_norm is not None:
        x = model.embed_norm(x)
    out = []
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda"):
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attn.project(block.norm_attn(x), model.position, 0)
            out.append(tuple(t.to(torch.bfloat16).contiguous() for t in (q, k, v)))
            x = block(x, model.position, 0, layer, None, None)
    return [(*t, model.position.attention_slopes()) for t in out]


def _forward_rows(layer: int, q, k, v, slopes, tolerances: list[float]) -> dict:
    flops = 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] / 2  # causal
    dense = attention(q, k, v, slopes=slopes, backend="triton")
    row: dict = {"layer": layer, "dense_ms": _ms(lambda: attention(q, k, v, slopes=slopes, backend="triton"))}
    if not ARGS.cpu_smoke:
        row["sdpa_no_bias_ms"] = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1),
            is_causal=True))
    row["dense_tflops"] = flops / row["dense_ms"] / 1e9
    for tol in tolerances:
        stats: dict = {}
        out = bounded_attention(q, k, v, slopes=slopes, tolerance=tol, stats=stats)
        row[f"bounded@{tol:g}"] = {
            "ms": _ms(lambda tol=tol: bounded_attention(q, k, v, slopes=slopes, tolerance=tol)),
            "tiles_visited_share": stats["tiles_visited"] / stats["tiles_dense"],
            "max_err_vs_dense": (out.float() - dense.float()).abs().max().item(),
            "promised": 2 * tol * v.float().abs().max().item(),
        }
    return row


def _decode_row(layer: int, batch: int, q_last, k, v, slopes, tolerances: list[float]) -> dict:
    """One new token (the window's last query) over the layer's keys as a cache of `batch` sequences."""
    kb, vb = (t.expand(batch, -1, -1, -1).contiguous() for t in (k, v))
    q = q_last.expand(batch, -1, -1, -1).contiguous()
    n = kb.shape[2]
    prefix = key_norm_prefix_max(kb, suffix=False)[0]  # what a KV cache keeps per append
    row = {"layer": layer, "batch": batch, "cache": n,
           "dense_ms": _ms(lambda: triton_decode(q, kb, vb, slopes=slopes, q_offset=n - 1))}
    for tol in tolerances:
        stats: dict = {}

        def bounded(tol=tol, stats=None):
            return bounded_attention(q, kb, vb, slopes=slopes, q_offset=n - 1, tolerance=tol, stats=stats,
                                     key_norm_max=prefix)

        bounded(stats=stats)
        row[f"bounded@{tol:g}"] = {"ms": _ms(bounded),
                                   "tiles_visited_share": stats["tiles_visited"] / stats["tiles_dense"]}
    return row


def _markdown(result: dict) -> str:
    tolerances = result["meta"]["tolerances"]
    lines = [f"# Bounded-error attention, {result['meta']['device']}, {result['meta']['date']}", "",
             f"`{result['meta']['command']}`; model {result['meta']['model']}, L = {result['meta']['length']}", "",
             "| layer | dense ms | sdpa no bias ms | "
             + " | ".join(f"@{t:g} ms (tiles, err)" for t in tolerances) + " |",
             "|---|---|---|" + "---|" * len(tolerances)]
    for row in result["forward"]:
        cells = [f"{row[f'bounded@{t:g}']['ms']:.3f} ({row[f'bounded@{t:g}']['tiles_visited_share']:.0%}, "
                 f"{row[f'bounded@{t:g}']['max_err_vs_dense']:.1e})" for t in tolerances]
        lines.append(f"| {row['layer']} | {row['dense_ms']:.3f} | {row.get('sdpa_no_bias_ms', float('nan')):.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| layer | batch | cache | dense decode ms | "
              + " | ".join(f"@{t:g} ms (tiles)" for t in tolerances) + " |",
              "|---|---|---|---|" + "---|" * len(tolerances)]
    for row in result["decode"]:
        cells = [f"{row[f'bounded@{t:g}']['ms']:.3f} ({row[f'bounded@{t:g}']['tiles_visited_share']:.0%})"
                 for t in tolerances]
        lines.append(f"| {row['layer']} | {row['batch']} | {row['cache']} | {row['dense_ms']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if not ARGS.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-smoke)")
    if not ARGS.cpu_smoke and ARGS.checkpoint is None:
        sys.exit("pass --checkpoint: random weights do not show a trained model's norms")
    if ARGS.cpu_smoke:
        ARGS.length, ARGS.decode_batch = 64, 2
    ARGS.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if ARGS.cpu_smoke else "cuda")
    tolerances = [float(t) for t in ARGS.tolerances.split(",")]
    model, tokens, name = _model_and_tokens(device)
    if model.position.attention_slopes() is None:
        sys.exit(f"{name} has {model.cfg.position} positions: the bounded kernel needs ALiBi slopes")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": "cpu (interpreter)" if ARGS.cpu_smoke else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "model": name, "length": tokens.shape[1],
            "tolerances": tolerances, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    result: dict = {"meta": meta, "forward": [], "decode": []}
    for layer, (q, k, v, slopes) in enumerate(_layer_inputs(model, tokens)):
        result["forward"].append(_forward_rows(layer, q, k, v, slopes.float(), tolerances))
        result["decode"] += [_decode_row(layer, batch, q[:, :, -1:], k, v, slopes.float(), tolerances)
                             for batch in (1, ARGS.decode_batch)]
        (ARGS.out / "bounded.json").write_text(json.dumps(result, indent=1))
    (ARGS.out / "bounded.md").write_text(_markdown(result))
    print(_markdown(result), end="")


if __name__ == "__main__":
    main()
