"""Launching an autotuned Triton kernel past its autotuner once the autotuner has chosen.

`triton.autotune` finds its cached choice on every launch by zipping every argument into a dict and
reading the dtype of each tensor argument (~20 µs of host time per launch on the H100 host, where a
whole forward of a small shape takes less GPU time than that). The launchers know which of their
arguments decide the choice, so `TunedKernel` asks the autotuner once per such key (which benchmarks
the configs, as before) and from then on launches the chosen config's binary directly through the
JIT function, which still specialises on the arguments as usual (pointer alignment, integer values).
A launch with autotune=False, or inside `pinned`, skips the autotuner altogether.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import triton

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


class TunedKernel:
    """Wraps a `triton.autotune`d kernel. `key` must determine the autotuner's own key (its key
    arguments and the dtypes of the tensor arguments); the launchers pass exactly those values.

    A choice is forgotten when the autotuner gets a new config list; clearing `autotuner.cache` alone or
    editing the list in place is not noticed: call `clear()`. To run one config of your own, use
    `pinned` rather than editing the list. Like Triton's autotuner itself (which keeps per-launch state
    on the instance), not thread-safe."""

    def __init__(self, autotuner: triton.runtime.Autotuner) -> None:
        self.autotuner = autotuner
        # key -> (the autotuner's config list when chosen, the chosen config, its launch kwargs)
        self._chosen: dict[Hashable, tuple[list, triton.Config, dict[str, Any]]] = {}
        # (config list, its first config, that config's launch kwargs), for launches with autotune=False
        self._first: tuple[list, triton.Config, dict[str, Any]] | None = None
        self._pin: tuple[triton.Config, dict[str, Any]] | None = None

    def launch(self, grid: Grid, key: Hashable, args: Sequence[Any], kwargs: dict[str, Any],
               autotune: bool = True) -> None:
        """Launch on `grid`. With autotune=False the first config of the list is launched as it is, none
        benchmarked (nor remembered as the autotuner's choice for `key`)."""
        tuner = self.autotuner
        if self._pin is not None:
            self._run(*self._pin, grid, args, kwargs)
            return
        if not autotune:
            first = self._first
            if first is None or first[0] is not tuner.configs:
                config = tuner.configs[0]
                first = self._first = (tuner.configs, config, config.all_kwargs())
            self._run(first[1], first[2], grid, args, kwargs)
            return
        hit = self._chosen.get(key)
        # A new config list makes every earlier choice stale.
        if hit is None or hit[0] is not tuner.configs:
            tuner[grid](*args, **kwargs)
            config = tuner.best_config
            self._chosen[key] = (tuner.configs, config, config.all_kwargs())
            return
        self._run(hit[1], hit[2], grid, args, kwargs)

    def _run(self, config: triton.Config, config_kwargs: dict[str, Any], grid: Grid, args: Sequence[Any],
             kwargs: dict[str, Any]) -> None:
        tuner = self.autotuner
        tuner.best_config = config  # what the autotuner itself would report after this launch
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(tuner.arg_names, args)), **kwargs, **config_kwargs})
        tuner.fn.run(*args, grid=grid(config.kwargs), warmup=False, **kwargs, **config_kwargs)

    @contextlib.contextmanager
    def pinned(self, config: triton.Config) -> Iterator[None]:
        """Launch `config` (whatever autotune asks) until the block ends: a benchmark timing one config."""
        before = self._pin
        self._pin = (config, config.all_kwargs())
        try:
            yield
        finally:
            self._pin = before

    def clear(self) -> None:
        self._chosen.clear()
