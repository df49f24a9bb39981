"""The benchmark scripts' CPU modes, run as the device runs them (a subprocess per script).

The benchmarks run on the GPU through a device tool with minutes per session: a script that broke
on the way (a renamed kernel argument, a changed results layout) would waste that time. Each test
runs a script's smoke mode and checks the numbers it wrote, not only that it exited.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alibi_lm.data import prepare

# each script runs in a subprocess of its own (a fresh interpreter, torch imported anew): ~40 s in all
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str | Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_attention_quick_times_every_variant_and_checks_them(tmp_path: Path) -> None:
    _run("attention_quick.py", "--out", tmp_path, "--cpu-smoke", "--profile")
    result = json.loads((tmp_path / "attention-quick.json").read_text())
    (row,) = result["rows"]
    for name in ("ours", "ours_pointer", "sdpa_no_bias"):
        assert row[name]["fwd_ms"] > 0 and row[name]["fwdbwd_ms"] > 0, (name, row[name])
        assert row[name]["profile"]["groups_ms_per_call"], name
    for check in ("check_zero_slopes_vs_sdpa", "check_pointer_zero_slopes_vs_sdpa", "check_slopes_vs_fp32"):
        assert row[check]["ok"] and row[check]["rel"] < 1e-2, (check, row[check])
    assert all(result["grad_check"][n]["ok"] for n in ("out", "dq", "dk", "dv", "dslopes"))
    assert "| ours | ours_pointer | sdpa_no_bias |" in (tmp_path / "attention-quick.md").read_text()


def test_launch_overhead_times_every_layer_and_profiles_the_python_path(tmp_path: Path) -> None:
    _run("launch_overhead.py", "--out", tmp_path, "--cpu-smoke", "--calls", "2")
    result = json.loads((tmp_path / "launch_overhead.json").read_text())
    times = result["us_per_call"]
    layers = ("launcher", "custom op", "fwd (grad)", "backward launcher", "bwd custom op", "fwd+bwd", "sdpa fwd+bwd")
    assert all(isinstance(times[name], float) and times[name] > 0 for name in layers), times
    for name in ("launcher", "backward launcher", "fwd+bwd"):
        top = result["python_profile"][name]
        assert top and all(row["own_us_per_call"] >= 0 and row["calls_per_call"] > 0 for row in top), name
        # sorted by own time, each row's cumulative time at least its own
        assert [row["own_us_per_call"] for row in top] == sorted((row["own_us_per_call"] for row in top), reverse=True)
        assert all(row["cumulative_us_per_call"] >= row["own_us_per_call"] for row in top), name
    assert "function calls" in (tmp_path / "launch_overhead_python_profile.txt").read_text()


def test_autograd_overhead_times_every_piece_of_the_round_trip(tmp_path: Path) -> None:
    _run("autograd_overhead.py", "--out", tmp_path, "--cpu-smoke", "--calls", "2")
    times = json.loads((tmp_path / "autograd-overhead.json").read_text())["us_per_call"]
    assert len(times) == 10 and all(isinstance(t, float) and t > 0 for t in times.values()), times
    # the timed launcher runs inside the Function's backward, so it cannot take longer than the whole
    assert times["  inside its backward"] <= times["FullTimed fwd+bwd"], times


def test_decode_split_times_both_plans_against_sdpa(tmp_path: Path) -> None:
    _run("decode_split.py", "--out", tmp_path, "--cpu-smoke")
    rows = json.loads((tmp_path / "decode-split.json").read_text())["rows"]
    # 2 batches x 2 caches, each the split plan, one pass and SDPA
    assert [r["mode"] for r in rows] == ["split", "one", "sdpa_no_bias"] * 4
    assert all(r["host_loop_us"] > 0 for r in rows)
    # both plans compute the same attention as the library's own choice, up to bf16 rounding
    assert all(r["err"] < 1e-2 for r in rows if r["mode"] != "sdpa_no_bias"), rows


def test_forward_descriptors_times_both_loads_and_compares_them(tmp_path: Path) -> None:
    _run("forward_descriptors.py", "--out", tmp_path, "--cpu-smoke")
    (row,) = json.loads((tmp_path / "forward-descriptors.json").read_text())["rows"]
    for way in ("tma=True", "tma=False"):
        assert row[way]["ms"] > 0 and "BLOCK_M" in row[way]["config"], row[way]
    # descriptors and pointer loads compute the same forward, up to the order of fp32 additions
    assert row["diff"] < 1e-2, row


def test_forward_configs_times_each_pinned_config(tmp_path: Path) -> None:
    _run("forward_configs.py", "--out", tmp_path, "--cpu-smoke")
    runs = json.loads((tmp_path / "forward-configs.json").read_text())["runs"]
    assert list(runs) == ["D16 L64 32x16 w4 s1", "D16 L64 16x16 w4 s1"], runs
    # every config computes the first one's forward, up to the order of fp32 additions
    assert all(r["ms"] > 0 and r["diff"] < 1e-2 for r in runs.values()), runs
    # an experiment's flag must exist in the (patched) kernel: without the patch the script says so
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "forward_configs.py"), "--out", str(tmp_path),
                           "--cpu-smoke", "--flag", "NO_SUCH_FLAG"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0 and "no constexpr 'NO_SUCH_FLAG'" in done.stderr, done.stderr[-2000:]


def test_backward_study_sweeps_both_kernels_and_keeps_their_gradients(tmp_path: Path) -> None:
    _run("backward_study.py", "--out", tmp_path, "--cpu-smoke")
    (result,) = json.loads((tmp_path / "backward-study.json").read_text())["results"]
    for name in ("_dkdv", "_dq"):
        rows = result["sweeps"][name]
        assert len({tuple(row["config"]) for row in rows}) == len(rows) >= 2, rows
        # every config computes the default configs' gradients, up to the order of fp32 additions
        assert all(row["backward_ms"] > 0 and row["max_abs_diff"] < 1e-2 for row in rows), rows
    assert result["bias_cost"]["with_slopes_ms"] > 0 and result["bias_cost"]["without_slopes_ms"] > 0
    assert result["profiles"]["ours"]["fwdbwd_ms"] > 0
    assert "`_dkdv` swept" in (tmp_path / "backward-study.md").read_text()


def test_eval_memory_evaluates_every_length(tmp_path: Path) -> None:
    _run("eval_memory.py", "--out", tmp_path, "--cpu-smoke")
    rows = json.loads((tmp_path / "eval-memory.json").read_text())["rows"]
    assert {r["position"] for r in rows} == {"alibi", "sinusoidal"}
    # random weights: the mean loss is near ln(vocab) and finite at every length
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 20 and r["tokens_per_second"] > 0 for r in rows)


def test_generate_benchmark_times_every_method(tmp_path: Path) -> None:
    _run("generate.py", "--out", tmp_path, "--cpu-smoke")
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["alibi_triton", "alibi_sdpa_bias_row", "none_sdpa"]
    # batch 2 x 4 new tokens each, all generated (no stop token), at a positive rate
    assert all(r["new_tokens"] == 8 and r["tokens_per_s"] > 0 and len(r["first_tokens"]) == 4 for r in rows)
    assert "| 24 | 2 |" in (tmp_path / "generate.md").read_text()


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare("embedded", path, tokenizer="bytes", progress=False)
    return path


def test_reproduce_wt2_smoke_writes_results_and_report(tmp_path: Path, byte_corpus: Path) -> None:
    out = tmp_path / "out"
    _run("reproduce_wt2.py", "--data", byte_corpus, "--out", out, "--work-dir", tmp_path / "work",
         "--positions", "alibi,sinusoidal", "--smoke", "--no-progress", "--report")
    for run in ("alibi", "sinusoidal"):
        result = json.loads((out / f"{run}.json").read_text())
        assert result["evaluations"] and all(math.isfinite(e["ppl"]) and e["ppl"] > 1
                                              for e in result["evaluations"])
        assert (out / f"{run}.metrics.jsonl").read_text().strip()
    assert "| alibi |" in (out / "RESULTS_wt2.md").read_text()


def test_train_benchmark_measures_and_profiles_each_case(tmp_path: Path) -> None:
    _run("train.py", "--out", tmp_path / "eager", "--suite", "smoke", "--positions", "alibi,none", "--steps", "2",
         "--warmup", "1", "--profile", "1", "--no-compile")
    results = json.loads((tmp_path / "eager" / "train_bench.json").read_text())["results"]
    assert [(r["position"], r["compile"]) for r in results] == [("alibi", False), ("none", False)]
    for r in results:
        assert r["tokens_per_second"] > 0 and math.isfinite(r["final_loss"]), r
        assert r["profile"]["groups_ms_per_call"] and r["profile"]["top_host_ops"], r["profile"]
    # the CUDA-graph compile mode goes through the same step (on a CPU torch.compile skips the capture)
    _run("train.py", "--out", tmp_path / "graphs", "--suite", "smoke", "--positions", "alibi", "--steps", "2",
         "--warmup", "1", "--compile-mode", "reduce-overhead")
    (r,) = json.loads((tmp_path / "graphs" / "train_bench.json").read_text())["results"]
    assert r["compile"] == "reduce-overhead" and math.isfinite(r["final_loss"])


def test_bounded_benchmark_times_dense_and_bounded_and_checks_the_error(tmp_path: Path) -> None:
    _run("bounded.py", "--out", tmp_path, "--cpu-smoke", "--tolerances", "1e-2,1e-6")
    result = json.loads((tmp_path / "bounded.json").read_text())
    assert len(result["forward"]) == 2 and len(result["decode"]) == 4
    for row in result["forward"]:
        for tol in ("0.01", "1e-06"):
            bounded = row[f"bounded@{tol}"]
            assert 0 < bounded["tiles_visited_share"] <= 1 and bounded["ms"] > 0
            assert bounded["max_err_vs_dense"] <= bounded["promised"] + 2**-6
    assert "| layer | batch | cache |" in (tmp_path / "bounded.md").read_text()
