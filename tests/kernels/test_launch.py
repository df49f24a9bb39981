"""TunedKernel: the autotuner chooses once per key, later launches skip it and run the chosen config;
autotune=False and `pinned` launch one config without asking the autotuner at all."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from alibi_lm.kernels.launch import TunedKernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _fill_block_kernel(X, N, SHIFT, BLOCK: tl.constexpr):
    """Writes BLOCK + SHIFT into every element, so the output names the config that ran."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.zeros([BLOCK], tl.float32) + BLOCK + SHIFT, mask=offs < N)


class _Timings:
    """A do_bench stand-in for the autotuner: the later a config is timed, the faster it is, so the
    last config in the list is chosen; counts how often the autotuner benchmarks."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, kernel_call, quantiles=None):
        kernel_call()
        self.calls += 1
        t = 100.0 - self.calls
        return [t, t, t] if quantiles else t


def _tuned(blocks: list[int], timings: _Timings, pre_hook=None) -> TunedKernel:
    configs = [triton.Config({"BLOCK": b}, num_warps=1, pre_hook=pre_hook) for b in blocks]
    return TunedKernel(triton.autotune(configs, key=["N"], do_bench=timings)(_fill_block_kernel))


def _launch(kernel: TunedKernel, n: int, shift: float = 0.0, autotune: bool = True) -> torch.Tensor:
    x = torch.full((n,), -1.0, device=DEVICE)
    kernel.launch(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), ("n", n), (x, n, shift), {}, autotune=autotune)
    return x


def test_first_launch_tunes_later_launches_reuse_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    timings = _Timings()
    kernel = _tuned([16, 32], timings)
    tuner_runs: list[int] = []
    run = kernel.autotuner.run
    monkeypatch.setattr(kernel.autotuner, "run", lambda *a, **kw: (tuner_runs.append(1), run(*a, **kw))[1])
    assert torch.equal(_launch(kernel, 40), torch.full((40,), 32.0, device=DEVICE))
    assert timings.calls == 2  # both configs timed once
    # same key: no benchmarking, the chosen config runs (every element written, ragged tail included)
    assert torch.equal(_launch(kernel, 40, shift=0.5), torch.full((40,), 32.5, device=DEVICE))
    assert timings.calls == 2
    assert len(tuner_runs) == 1  # the second launch went past the autotuner
    assert kernel.autotuner.best_config.kwargs == {"BLOCK": 32}
    # a new key is tuned afresh
    _launch(kernel, 70)
    assert timings.calls == 4 and len(tuner_runs) == 2


def test_a_new_config_list_makes_the_choice_stale() -> None:
    timings = _Timings()
    kernel = _tuned([16, 32], timings)
    _launch(kernel, 40)
    # a new list (as a caller replacing the configs would set it) is noticed without clear()
    kernel.autotuner.configs = [triton.Config({"BLOCK": 16}, num_warps=1)]
    kernel.autotuner.cache.clear()
    assert torch.equal(_launch(kernel, 40), torch.full((40,), 16.0, device=DEVICE))


def test_the_chosen_configs_pre_hook_runs_on_every_launch() -> None:
    seen: list[tuple[int, int]] = []
    kernel = _tuned([16, 32], _Timings(), pre_hook=lambda nargs: seen.append((nargs["N"], nargs["BLOCK"])))
    _launch(kernel, 40)
    seen.clear()  # the benchmark's calls
    _launch(kernel, 40)
    assert seen == [(40, 32)]


def test_without_autotuning_the_first_config_runs_unbenchmarked() -> None:
    timings = _Timings()
    seen: list[int] = []
    kernel = _tuned([16, 32], timings, pre_hook=lambda nargs: seen.append(nargs["BLOCK"]))
    assert torch.equal(_launch(kernel, 40, autotune=False), torch.full((40,), 16.0, device=DEVICE))
    assert timings.calls == 0 and seen == [16]  # nothing timed; the config's pre_hook still ran
    assert kernel.autotuner.best_config.kwargs == {"BLOCK": 16}
    # the pinned launch is not taken for the autotuner's choice: a tuned launch of the same key still tunes
    assert torch.equal(_launch(kernel, 40), torch.full((40,), 32.0, device=DEVICE))
    assert timings.calls == 2
    assert torch.equal(_launch(kernel, 40, autotune=False), torch.full((40,), 16.0, device=DEVICE))


def test_a_pinned_config_runs_until_the_block_ends() -> None:
    timings = _Timings()
    kernel = _tuned([16, 32], timings)
    _launch(kernel, 40)  # tuned: 32
    with kernel.pinned(triton.Config({"BLOCK": 64}, num_warps=1)):
        assert torch.equal(_launch(kernel, 40), torch.full((40,), 64.0, device=DEVICE))
        assert torch.equal(_launch(kernel, 70, autotune=False), torch.full((70,), 64.0, device=DEVICE))
    assert timings.calls == 2  # the pinned launches benchmarked nothing
    assert torch.equal(_launch(kernel, 40), torch.full((40,), 32.0, device=DEVICE))  # the earlier choice again
