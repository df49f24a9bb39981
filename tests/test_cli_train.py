"""Bad input through the CLI: one clear line on stderr, exit code 2, no traceback, nothing deleted."""

import json

import pytest

from alibi_lm.cli import main
from alibi_lm.data import prepare

TINY = ["model.n_layers=1", "model.d_model=32", "data.train_len=16", "data.batch_size=2", "run.steps=2",
        "run.eval_every=0", "run.checkpoint_every=1", "data.valid_tokens=256"]


def _fails(capsys, argv, *messages):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(message in err for message in messages), err
    return err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare("embedded", path, tokenizer="bytes", progress=False)
    return path


def _train(data_dir, out, *sets, resume=False):
    argv = ["train", "--config", "tiny", "--no-progress", "--set", f"data.path={data_dir}",
            "--set", f"run.out_dir={out}"]
    for s in [*TINY, *sets]:
        argv += ["--set", s]
    return argv + (["--resume"] if resume else [])


def test_prepare_missing_empty_and_non_utf8(tmp_path, capsys):
    _fails(capsys, ["prepare", str(tmp_path / "none.txt"), "-o", str(tmp_path / "o")], "no such file")
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, ["prepare", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "o")], "is empty")
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    _fails(capsys, ["prepare", str(tmp_path / "latin1.txt"), "-o", str(tmp_path / "o")], "not UTF-8")
    _fails(capsys, ["prepare", "wikitxt-2", "-o", str(tmp_path / "o")], "did you mean")
    _fails(capsys, ["prepare", "embedded", "-o", str(tmp_path / "o"), "--tokenizer", "bpe", "--vocab-size", "0"],
           "vocab size")


def test_prepare_prints_counts(tmp_path, capsys):
    assert main(["prepare", "embedded", "-o", str(tmp_path / "o"), "--tokenizer", "bytes", "--no-progress"]) == 0
    assert "train" in capsys.readouterr().out


def test_prepare_says_when_bpe_falls_short_of_the_vocabulary_asked_for(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(60)))
    assert main(["prepare", str(tmp_path / "small.txt"), "-o", str(tmp_path / "o"), "--tokenizer", "bpe",
                 "--vocab-size", "100000", "--no-progress"]) == 0
    assert "BPE tokens, not the 100,000 asked for" in capsys.readouterr().out


def test_corpus_shorter_than_one_window(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    assert main(["prepare", str(tmp_path / "short.txt"), "-o", str(tmp_path / "d"), "--tokenizer", "bytes",
                 "--no-progress"]) == 0
    capsys.readouterr()
    _fails(capsys, _train(tmp_path / "d", tmp_path / "run", "data.train_len=4096"), "fewer than one training window")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("data.train_len=0", "data.train_len must be a positive integer"),
    ("data.batch_size=-1", "data.batch_size must be a positive integer"),
    ("model.n_layer=2", 'did you mean "n_layers"'),
    ("run.stpes=2", 'did you mean "steps"'),
    ("run.device=gpu", "unknown device 'gpu'"),
    pytest.param("run.device=cuda", "no CUDA device is available",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is present")),
])
def test_bad_settings(tmp_path, capsys, data_dir, setting, message):
    _fails(capsys, _train(data_dir, tmp_path / "run", setting), message)


def test_unknown_key_in_config_file_and_unknown_preset(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[model]\nn_head = 4\n")
    _fails(capsys, ["train", "--config", str(tmp_path / "c.toml")], 'did you mean "n_heads"')
    _fails(capsys, ["train", "--config", "tinyy"], 'did you mean "tiny"')
    _fails(capsys, ["train", "--config", str(tmp_path)], "is a directory; --config takes a TOML file")
    _fails(capsys, _train(tmp_path / "nodata", tmp_path / "run", "data.source="), "alibi-lm prepare")


def test_resume_errors_never_delete_checkpoints(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    assert main(_train(data_dir, run)) == 0
    capsys.readouterr()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000001", "step_00000002"]
    # a second run into the same directory without --resume
    _fails(capsys, _train(data_dir, run), "already has checkpoints")
    # resume with a different model
    _fails(capsys, _train(data_dir, run, "model.d_model=64", resume=True), "model config differs")
    # nothing to resume
    _fails(capsys, _train(data_dir, tmp_path / "empty", resume=True), "no checkpoint")
    # truncated and corrupted checkpoints
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _fails(capsys, _train(data_dir, run, "run.steps=4", resume=True),
           "corrupt checkpoint", "step_00000001 is intact: move step_00000002 out of")
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text("{")
    _fails(capsys, _train(data_dir, run, "run.steps=4", resume=True), "corrupt checkpoint")
    # the run's own config.json is a valid --config, and it points at this run
    _fails(capsys, ["train", "--config", str(run / "config.json")], "already has checkpoints")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ckpts
    assert weights.read_bytes() == data[: len(data) // 2]


def test_automatic_prepare_says_so_and_prepared_data_keeps_its_tokenizer(tmp_path, capsys, data_dir):
    fresh = tmp_path / "typo-or-new"
    assert main(_train(fresh, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert f"{fresh} holds no prepared data; preparing it from data.source='embedded'" in err, err
    # data already prepared with bytes, asked for with bpe: trained on as it is, said, and recorded truly
    assert main(_train(data_dir, tmp_path / "run2", "data.tokenizer=bpe")) == 0
    err = capsys.readouterr().err
    assert "note: data.tokenizer=bpe does not apply" in err and "prepared with the bytes tokenizer" in err, err
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["data"]["tokenizer"] == "bytes"


def test_a_file_as_data_path_gets_a_hint_that_works(tmp_path, capsys):
    """`--set data.path=plain.txt` said to run `alibi-lm prepare SOURCE -o plain.txt`, which fails because
    plain.txt is a file (issue 16): the hint prepares the file into a folder of its own, and that works."""
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"line {i} of a small corpus\n" for i in range(300)))
    err = _fails(capsys, _train(plain, tmp_path / "run"), "plain.txt is a file")
    hinted = err.split("alibi-lm prepare ", 1)[1].split(", then")[0].split()
    assert main(["prepare", *hinted, "--tokenizer", "bytes", "--no-progress"]) == 0
    assert (tmp_path / "plain-prepared" / "meta.json").is_file()


def test_resume_says_where_it_starts_and_ctrl_c_says_where_to_resume(data_dir, tmp_path, capsys, monkeypatch):
    from alibi_lm.train import loop as train_module  # where the loop looks its step function up

    run = tmp_path / "run"
    assert main(_train(data_dir, run, "run.steps=2")) == 0
    capsys.readouterr()
    assert main(_train(data_dir, run, "run.steps=3", resume=True)) == 0
    assert f"resuming {run / 'checkpoints' / 'step_00000002'} at step 2 of 3" in capsys.readouterr().err

    calls = []

    def interrupt_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", interrupt_on_the_second_step)
    assert main(_train(data_dir, run, "run.steps=6", resume=True)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the newest checkpoint is {run / 'checkpoints' / 'step_00000004'} (step 4 of 6)" in err, err
    assert f"alibi-lm train --config {run / 'config.json'} --resume" in err
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(_train(data_dir, run, "run.steps=6", resume=True)) == 0  # the lock was released


def test_init_from_starts_a_new_run_from_the_weights(data_dir, tmp_path, capsys):
    """Train short, then a new run at twice the length from those weights (run.init_from); a model of
    another shape is one line naming the fields."""
    short = tmp_path / "short"
    assert main(_train(data_dir, short, "run.steps=30", "optim.lr=3e-3", "schedule.warmup_steps=2")) == 0
    fresh, longer = tmp_path / "fresh", tmp_path / "longer"
    assert main(_train(data_dir, fresh, "data.train_len=32", "run.steps=1", "run.log_every=1")) == 0
    assert main(_train(data_dir, longer, "data.train_len=32", "run.steps=1", "run.log_every=1",
                       f"run.init_from={short}")) == 0
    assert "starting from the weights of" in capsys.readouterr().err

    def first_loss(run):
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss(longer) < first_loss(fresh) - 0.5, (first_loss(longer), first_loss(fresh))
    saved = json.loads((longer / "config.json").read_text())
    assert saved["run"]["init_from"] == str(short) and saved["data"]["train_len"] == 32
    _fails(capsys, _train(data_dir, tmp_path / "other", "model.n_layers=2", f"run.init_from={short}"),
           "run.init_from", "model.n_layers: 1 there, 2 here")


def test_tensorboard_gets_the_metrics(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(_train(data_dir, run, "run.steps=4", "run.log_every=2", "run.tensorboard=true")) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    board = {e.step: e.value for e in events.Scalars("loss")}
    assert board == pytest.approx({r["step"]: r["loss"] for r in logged}, rel=1e-6)
    assert "lr" in events.Tags()["scalars"]
