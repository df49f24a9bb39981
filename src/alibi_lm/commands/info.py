"""`alibi-lm info`: versions, device and the attention backends that can run here."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

NAME = "info"
HELP = "show versions, the device and the available attention backends"
ORDER = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


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
        ("auto backend", "triton for ALiBi in fp16/bf16 on CUDA, else sdpa"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
