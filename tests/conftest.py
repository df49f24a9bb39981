"""Test set-up. Without a GPU, Triton kernels run in its interpreter; the variable must be set before
Triton is first imported, which is why it is set here, at collection time, before any test module.

Hypothesis draws the same examples on every run (derandomize): a red CI must be reproducible from
its log, not the luck of one draw. `pytest -m "not slow"` leaves out the end-to-end runs (the demo,
the training runs with resume and SIGKILL, multi-process DDP): see README, Development."""

import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("deterministic", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("deterministic")
