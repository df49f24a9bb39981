"""Two CPU ranks on gloo (torchrun) with batch b give the losses of one process with batch 2b; the
DDP run resumes; FSDP2 (run.parallel = "fsdp") constructs and trains to the same losses. Every rank
has stopped gloo's threads when training returns (else one can abort the process as Python exits)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from alibi_lm.checkpoint import load_checkpoint, step_checkpoints
from alibi_lm.config import load_config
from alibi_lm.data import prepare
from alibi_lm.train import train

STEPS = 6
BASE = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.dropout=0.0", "data.train_len=32",
        "data.valid_tokens=1024", f"run.steps={STEPS}", "run.log_every=1", "run.eval_every=3",
        "run.checkpoint_every=3", "run.keep_last=5", "schedule.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare("embedded", path, tokenizer="bytes", progress=False)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("single")
    cfg = load_config("tiny", BASE + [f"data.path={data_dir}", f"run.out_dir={out}", "data.batch_size=8"])
    train(cfg, progress=False)
    return _metrics(out)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Each rank runs `alibi-lm train` as `python -m alibi_lm` does, then writes down the gloo threads still
# running (Linux names them in /proc): a group that outlives training keeps them, and a worker freeing a
# finished collective's tensors while Python finalizes aborts the process (SIGABRT, about one run in 30
# on 2 busy cores); `distributed.shutdown` destroys the group so that they are joined before that.
RANK_MAIN = """\
import json, os, sys
from alibi_lm.cli import main
code = main(sys.argv[2:])
tasks = "/proc/self/task"
names = []
for tid in os.listdir(tasks) if os.path.isdir(tasks) else []:
    try:
        with open(os.path.join(tasks, tid, "comm")) as f:
            names.append(f.read().strip())
    except OSError:
        pass
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(names, f)
sys.exit(code)
"""


def _torchrun(data_dir, out, *extra):
    script, threads = out.parent / "rank_main.py", out.parent / f"{out.name}-threads"
    script.write_text(RANK_MAIN)
    shutil.rmtree(threads, ignore_errors=True)
    threads.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(threads), "train", "--config", "tiny", "--no-progress", "--set", f"data.path={data_dir}",
           "--set", f"run.out_dir={out}", "--set", "data.batch_size=4", *[a for s in BASE for a in ("--set", s)],
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # shutdown's search for device meshes must not touch torch.distributed's deprecated attributes
    assert "FutureWarning" not in done.stderr, done.stderr[-3000:]
    for rank in (0, 1):
        left = [n for n in json.loads((threads / f"rank{rank}.json").read_text()) if "gloo" in n]
        assert not left, f"rank {rank}: gloo threads still running after training: {left}"
    return _metrics(out)


def _assert_same(a, b, keys=("loss", "valid_loss")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra or key in rb:
                assert math.isclose(ra[key], rb[key], rel_tol=2e-5), (ra["step"], key, ra[key], rb[key])


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_double_batch_and_resume(tmp_path, data_dir, single):
    out = tmp_path / "ddp"
    ddp = _torchrun(data_dir, out)
    _assert_same(ddp, single)
    assert [p.name for p in step_checkpoints(out)] == ["step_00000003", "step_00000006"]
    meta = load_checkpoint(out).meta
    assert meta["world_size"] == 2 and {"rng_cpu_rank0", "rng_cpu_rank1"} <= set(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "checkpoints/step_00000006/"
                                                                               "train_state.safetensors")))
    # Resume the 2-rank run from step 3: steps 4-6 come out as before.
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    resumed = _torchrun(data_dir, out, "--resume")
    _assert_same(resumed, ddp, keys=("loss",))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ddp]


@pytest.mark.slow
def test_fsdp2_constructs_and_matches_one_process(tmp_path, data_dir, single):
    out = tmp_path / "fsdp"
    fsdp = _torchrun(data_dir, out, "--set", "run.parallel=fsdp")
    _assert_same(fsdp, single)
    ckpt = load_checkpoint(out)
    assert ckpt.meta["step"] == STEPS and ckpt.meta["optimizer_param_groups"]
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    resumed = _torchrun(data_dir, out, "--set", "run.parallel=fsdp", "--resume")
    _assert_same(resumed, fsdp, keys=("loss", "valid_loss"))
