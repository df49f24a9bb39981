"""`alibi-lm info`: versions, device and the attention backends that can run here."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

NAME = "info"
HELP = "show versions, the device and the available attention backends"
ORDER = 90


DESCRIPTION = """\
Versions, the device and the attention backends that can run here. With a checkpoint (or a run
directory), also which attention backend its model takes here, for training and for inference, and why.

Examples:
  alibi-lm info
  alibi-lm info runs/small
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a checkpoint or run directory: say which backend its attention uses here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import torch

    from alibi_lm import __version__
    from alibi_lm.kernels import available_backends

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda:0 {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        device = "cpu (no CUDA device)"
    rows = [
        ("alibi-lm", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("device", device),
        ("attention backends", ", ".join(available_backends())),
        ("auto backend", "triton for ALiBi in fp16/bf16 on CUDA (no dropout, no extra bias), else sdpa"),
    ]
    if args.checkpoint is not None:
        rows += _model_rows(args.checkpoint, args.device)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _model_rows(checkpoint: str, device_name: str) -> list[tuple[str, str]]:
    """What `attention(backend="auto")` does with this model's calls on this machine, and why."""
    import torch

    from alibi_lm.checkpoint import load_checkpoint
    from alibi_lm.distributed import pick_device
    from alibi_lm.kernels import choose_backend

    device = pick_device(device_name)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    # training and evaluation on CUDA run under bf16 autocast, on the CPU in float32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    alibi, bias = ckpt.model.position.attention_slopes() is not None, ckpt.model.position.score_bias
    rows = [("model", f"{ckpt.path}: {cfg.position}, {cfg.n_heads} heads of {cfg.head_dim}, "
                      f"attention_backend={cfg.attention_backend}")]
    for use, dropout in (("training", cfg.attn_dropout), ("inference", 0.0)):
        if cfg.attention_backend != "auto":
            rows.append((f"{use} backend", f"{cfg.attention_backend} (set in the model config)"))
            continue
        name, why = choose_backend(device, dtype, cfg.head_dim, alibi=alibi, bias=bias, dropout_p=dropout)
        rows.append((f"{use} backend", f"{name}: {why}"))
    if cfg.attn_tolerance > 0:
        rows.append(("attn_tolerance", f"{cfg.attn_tolerance:g} (bounded-error attention on the triton backend)"))
    return rows
