"""Test set-up. Without a GPU, Triton kernels run in its interpreter; the variable must be set before
Triton is first imported, which is why it is set here, at collection time, before any test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
