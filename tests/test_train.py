"""Training: exact resume after SIGKILL, gradient accumulation, schedule, divergence, early stopping."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from alibi_lm.checkpoint import latest_checkpoint, load_checkpoint, lock_run_dir, step_checkpoints
from alibi_lm.config import load_config
from alibi_lm.data import prepare
from alibi_lm.errors import UserError
from alibi_lm.train import flops_per_token, lr_at, train

TOML = """
[model]
vocab_size = 256
n_layers = 2
d_model = {d_model}
n_heads = 4
dropout = {dropout}
[data]
path = "{data}"
train_len = {length}
batch_size = 4
valid_tokens = 2048
[optim]
lr = 3e-3
[schedule]
warmup_steps = 5
[run]
out_dir = "{out}"
steps = {steps}
log_every = 1
eval_every = 10
checkpoint_every = 3
keep_last = 2
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare("embedded", path, tokenizer="bytes", progress=False)
    return path


def _config_file(tmp_path, data_dir, out, *, steps=30, d_model=32, length=32, dropout=0.1):
    path = tmp_path / f"cfg-{out}.toml"
    path.write_text(TOML.format(data=data_dir, out=tmp_path / out, steps=steps, d_model=d_model, length=length,
                                dropout=dropout))
    return path


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _cli(config, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "alibi_lm", "train", "--config", str(config), "--no-progress", *extra], env


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_bitwise_identical_losses(tmp_path, data_dir):
    steps = 60
    # Unbroken reference run (a subprocess too, so both use the same thread settings).
    cmd, env = _cli(_config_file(tmp_path, data_dir, "ref", steps=steps, d_model=64, length=64))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, steps + 1))

    kill_at = random.Random().randint(4, steps - 10)
    config = _config_file(tmp_path, data_dir, "broken", steps=steps, d_model=64, length=64)
    cmd, env = _cli(config)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "broken" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= kill_at:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = max(_losses(tmp_path / "broken"))
    assert killed_after < steps
    assert latest_checkpoint(tmp_path / "broken") is not None, f"no checkpoint before the kill at step {killed_after}"

    cmd, env = _cli(config, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    resumed = _losses(tmp_path / "broken")
    assert resumed == reference  # every step, bit for bit (floats compared exactly)
    assert [p.name for p in step_checkpoints(tmp_path / "broken")] == ["step_00000057", "step_00000060"]
    ckpt = load_checkpoint(tmp_path / "broken")
    assert ckpt.meta["step"] == steps and ckpt.tokenizer.kind == "bytes" and ckpt.train_len == 64


def test_grad_accumulation_matches_one_big_batch(tmp_path, data_dir):
    base = [f"data.path={data_dir}", "model.dropout=0.0", "run.steps=4", "run.log_every=1", "run.eval_every=0",
            "run.checkpoint_every=0", "model.n_layers=1", "model.d_model=32", "data.train_len=16"]
    big = train(load_config(str(_config_file(tmp_path, data_dir, "x")), base + [
        f"run.out_dir={tmp_path / 'big'}", "data.batch_size=8"]), progress=False)
    small = train(load_config(str(_config_file(tmp_path, data_dir, "x")), base + [
        f"run.out_dir={tmp_path / 'acc'}", "data.batch_size=4", "data.grad_accum=2"]), progress=False)
    a, b = _losses(big.run_dir), _losses(small.run_dir)
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a)
    assert big.tokens_per_second > 0 and big.peak_memory_bytes > 0
    assert big.final_valid_loss is not None and math.isfinite(big.final_valid_loss)
    record = json.loads((big.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["valid_word_ppl"] > record["valid_ppl"]  # bytes per word > 1
    assert json.loads((big.run_dir / "config.json").read_text())["data"]["batch_size"] == 8


def test_schedule_warmup_then_cosine_to_floor(tmp_path):
    cfg = load_config("tiny", ["optim.lr=1.0", "schedule.warmup_steps=10", "run.steps=110",
                               "schedule.min_lr_ratio=0.1"])

    def lr(step):
        return lr_at(step, cfg.optim, cfg.schedule, cfg.run.steps)

    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    cfg.schedule.kind = "linear"
    assert lr(60) == pytest.approx(0.55) and lr(35) == pytest.approx(1 - 0.9 * 0.25)


def test_flops_per_token_counts_attention():
    from alibi_lm.model import ModelConfig, TransformerLM

    model = TransformerLM(ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4))
    n = model.num_parameters()
    assert flops_per_token(model, 64) == 6 * n + 12 * 2 * 64 * 32


def _checkpoint_loss(path, data_dir) -> float:
    """The mean next-token loss of a checkpoint's weights on the first training windows."""
    import numpy as np

    from alibi_lm.data import load_tokens

    model = load_checkpoint(path).model.eval()
    tokens = torch.from_numpy(np.asarray(load_tokens(data_dir, "train")[:4 * 33], dtype=np.int64)).view(4, 33)
    with torch.no_grad():
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    return float(loss)


def test_non_finite_loss_stops_and_keeps_only_checkpoints_that_give_a_finite_loss(tmp_path, data_dir):
    # lr 1e30: the first update gives finite but huge weights (a checkpoint of them is written), whose
    # loss is not finite: that checkpoint is not a good one
    cfg = load_config(str(_config_file(tmp_path, data_dir, "nan", steps=20)), [
        "optim.lr=1e30", "schedule.warmup_steps=0", "optim.grad_clip=0", "run.checkpoint_every=1",
        "schedule.kind=constant", "run.keep_last=1"])
    with pytest.raises(UserError, match="training diverged") as error:
        train(cfg, progress=False)
    assert "no good checkpoint was written" in str(error.value), error.value
    assert step_checkpoints(tmp_path / "nan") == [] and latest_checkpoint(tmp_path / "nan") is None
    (moved,) = (tmp_path / "nan" / "checkpoints").glob("diverged-step_*")  # kept for a post-mortem, not resumed
    assert not math.isfinite(_checkpoint_loss(moved, data_dir))
    # the failed run let go of its lock although its traceback (which holds its frames) is still alive
    lock_run_dir(tmp_path / "nan").close()


def test_divergence_after_a_resume_names_a_checkpoint_that_still_trains(tmp_path, data_dir):
    config = _config_file(tmp_path, data_dir, "late", steps=5)
    train(load_config(str(config), ["run.checkpoint_every=1", "run.keep_last=1"]), progress=False)
    assert [p.name for p in step_checkpoints(tmp_path / "late")] == ["step_00000005"]
    cfg = load_config(str(config), ["run.steps=20", "run.checkpoint_every=1", "run.keep_last=1", "optim.lr=1e30",
                                    "schedule.kind=constant", "optim.grad_clip=0"])
    with pytest.raises(UserError, match="training diverged") as error:
        train(cfg, resume=True, progress=False)
    kept = step_checkpoints(tmp_path / "late")
    # keep_last=1, yet the checkpoint before the bad one was kept: it is the one named, and it gives a finite loss
    assert [p.name for p in kept] == ["step_00000005"] and str(kept[0]) in str(error.value)
    assert math.isfinite(_checkpoint_loss(kept[0], data_dir))
    assert [p.name for p in (tmp_path / "late" / "checkpoints").glob("diverged-*")] == ["diverged-step_00000006"]


def test_resume_names_the_settings_that_changed_since_the_checkpoint(tmp_path, data_dir, capsys):
    config = _config_file(tmp_path, data_dir, "notes", steps=3)
    train(load_config(str(config)), progress=False)
    capsys.readouterr()
    train(load_config(str(config), ["run.steps=4", "run.log_every=2"]), resume=True, progress=False)
    assert capsys.readouterr().err.count("note:") == 1  # run.steps changes the schedule; log_every nothing
    train(load_config(str(config), ["run.steps=5", "optim.lr=1e-3", "run.log_every=2"]), resume=True, progress=False)
    note, resuming = capsys.readouterr().err.strip().splitlines()
    assert "resuming" in resuming and "at step 4 of 5" in resuming
    assert "optim.lr 0.003 -> 0.001" in note and "run.steps 4 -> 5" in note and "log_every" not in note


def test_a_killed_writers_temporary_folders_are_cleared_and_keep_last_holds_at_the_end(tmp_path, data_dir):
    config = _config_file(tmp_path, data_dir, "tidy", steps=6)
    run = tmp_path / "tidy"
    train(load_config(str(config), ["run.checkpoint_every=1", "run.keep_last=2"]), progress=False)
    leftovers = [run / "checkpoints" / ".tmp-step_00000007-123-abcdef12", run / ".tmp-best-123-abcdef12"]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    train(load_config(str(config), ["run.steps=8", "run.checkpoint_every=1", "run.keep_last=2"]), resume=True,
          progress=False)
    assert not any(path.exists() for path in leftovers)
    assert [p.name for p in step_checkpoints(run)] == ["step_00000007", "step_00000008"]


def test_early_stopping_when_validation_stops_improving(tmp_path, data_dir):
    cfg = load_config(str(_config_file(tmp_path, data_dir, "early", steps=50)), [
        "run.eval_every=2", "run.patience=2", "run.min_delta=100", "run.checkpoint_every=0"])
    result = train(cfg, progress=False)
    # first evaluation sets the best; two more without a 100-nat improvement stop the run
    assert result.stopped_early and result.steps == 6
    assert result.best_checkpoint is not None and load_checkpoint(result.best_checkpoint).meta["step"] == 2
    assert result.checkpoint.name == "step_00000006"


def test_a_second_process_cannot_train_into_a_locked_run(tmp_path, data_dir):
    config = load_config(str(_config_file(tmp_path, data_dir, "locked", steps=2)))
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    holder = lock_run_dir(run_dir)  # stands for another process that is training into this run
    try:
        with pytest.raises(UserError, match="another training process is writing to"):
            train(config, progress=False)
    finally:
        holder.close()
    assert not (run_dir / "checkpoints").exists()
    assert train(config, progress=False).steps == 2  # free again once the other one is done


def test_resume_with_no_steps_left_says_so(tmp_path, data_dir):
    config = load_config(str(_config_file(tmp_path, data_dir, "done", steps=3)))
    train(config, progress=False)
    with pytest.raises(UserError, match="nothing to resume: .* is at step 3 and run.steps is 3"):
        train(config, resume=True, progress=False)
    more = load_config(str(_config_file(tmp_path, data_dir, "done", steps=3)), ["run.steps=5"])
    assert train(more, resume=True, progress=False).steps == 5


def test_a_new_run_never_clobbers_files_it_did_not_write(tmp_path, data_dir):
    config = load_config(str(_config_file(tmp_path, data_dir, "r", steps=2)), ["run.eval_every=1"])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that are not a training run's \(notes.txt\)"):
        train(config, progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # not even a lock file was left
    (run_dir / "notes.txt").unlink()
    (run_dir / "config.json").write_text('{"architectures": ["BloomForCausalLM"]}')  # a Hugging Face export
    with pytest.raises(UserError, match=r"not a training run's \(config.json\)"):
        train(config, progress=False)
    (run_dir / "config.json").unlink()
    assert train(config, progress=False).steps == 2  # an empty directory is fine

    # a run whose checkpoints are gone still has its metrics and best model: a new run must not replace them
    for path in step_checkpoints(run_dir):
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="holds an earlier run's best model"):
        train(config, progress=False)
    assert (run_dir / "metrics.jsonl").read_text() == metrics and (run_dir / "best").is_dir()
    holder = lock_run_dir(run_dir)  # while another process trains here, that is what the user hears
    try:
        with pytest.raises(UserError, match="another training process is writing to"):
            train(config, progress=False)
    finally:
        holder.close()

    # a run that died before its first checkpoint (metrics only) is simply started again; a log stays
    for f in (run_dir / "best").iterdir():
        f.unlink()
    (run_dir / "best").rmdir()
    (run_dir / "train.log").write_text("the shell's copy of the output")
    assert train(config, progress=False).steps == 2
    assert (run_dir / "train.log").exists()


def test_resume_drops_a_torn_metrics_line_and_refuses_a_weights_only_checkpoint(tmp_path, data_dir):
    from alibi_lm.checkpoint import save_model_checkpoint

    first = load_config(str(_config_file(tmp_path, data_dir, "m", steps=3)))
    train(first, progress=False)
    metrics = tmp_path / "m" / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"step": 4, "loss": 1.2')  # what a kill in the middle of a write leaves
    more = load_config(str(_config_file(tmp_path, data_dir, "m", steps=5)))
    assert train(more, resume=True, progress=False).steps == 5
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    model_only = tmp_path / "w" / "checkpoints" / "step_00000002"
    save_model_checkpoint(model_only, load_checkpoint(tmp_path / "m").model, train_len=32)
    resume = load_config(str(_config_file(tmp_path, data_dir, "w", steps=5)))
    with pytest.raises(UserError, match="holds model weights only"):
        train(resume, resume=True, progress=False)


def test_cuda_graph_compile_mode_trains_like_the_default_mode(tmp_path, data_dir):
    """run.compile_mode=reduce-overhead (CUDA graphs on a GPU; on the CPU torch.compile skips the
    capture, while the step still marks each micro-batch as a new graph step and copies the loss out of
    the graph's memory) gives the default mode's losses, gradient accumulation included."""
    base = [f"data.path={data_dir}", "model.dropout=0.0", "run.steps=3", "run.log_every=1", "run.eval_every=0",
            "run.checkpoint_every=0", "model.n_layers=1", "model.d_model=32", "data.train_len=16",
            "data.batch_size=2", "data.grad_accum=2", "run.compile=true"]
    runs = {}
    for mode in ("default", "reduce-overhead"):
        cfg = load_config(str(_config_file(tmp_path, data_dir, "x")), base + [
            f"run.out_dir={tmp_path / mode}", f"run.compile_mode={mode}"])
        runs[mode] = _losses(train(cfg, progress=False).run_dir)
    a, b = runs["default"], runs["reduce-overhead"]
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a)


def test_cuda_graph_compile_mode_is_refused_under_torchrun(tmp_path):
    import contextlib

    from alibi_lm.distributed import DistInfo
    from alibi_lm.train.loop import setup

    cfg = load_config("tiny", ["run.compile=true", "run.compile_mode=reduce-overhead", f"run.out_dir={tmp_path}"])
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match="one process only"), contextlib.ExitStack() as held:
        setup(cfg, info, resume=False, held=held)


def test_the_validation_line_names_what_word_level_perplexity_is():
    """`word ppl 103877682.66` at step 50 of a byte model read as a bug (issue 16)."""
    from alibi_lm.train.loop import validation_line

    record = {"valid_loss": 2.5, "valid_ppl": 12.18, "valid_word_ppl": 103877682.66}
    line = validation_line(50, record, "bytes")
    assert line == "step 50: valid loss 2.5000 per token, ppl 12.18; per whitespace word: ppl 1.039e+08"
    word = validation_line(50, {"valid_loss": 4.6, "valid_ppl": 99.5, "valid_word_ppl": 99.5}, "word")
    assert word.endswith("ppl 99.50 (word-level: one token per word)") and "whitespace" not in word
