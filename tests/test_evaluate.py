import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alibi_lm.errors import UserError
from alibi_lm.evaluate import evaluate_lengths, plan_windows
from alibi_lm.model import ModelConfig, TransformerLM


def tiny_model(position: str = "alibi", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=37, n_layers=2, d_model=32, n_heads=4, position=position, max_len=64,
                      attention_backend="sdpa")
    model = TransformerLM(cfg)
    # untrained weights give near-uniform predictions; larger ones make positions matter
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval()


def random_tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 37, n).astype(np.uint16)


def explicit_nll(model: TransformerLM, context: np.ndarray, target: int) -> float:
    """NLL of `target` after `context`, from one forward pass of the whole context, float64."""
    with torch.no_grad():
        logits, _ = model(torch.tensor(context[None].astype(np.int64)))
    return -F.log_softmax(logits[0, -1].double(), -1)[int(target)].item()


@pytest.mark.parametrize("position", ["alibi", "sinusoidal", "rotary"])
def test_nonoverlapping_matches_hand_loop(position):
    model = tiny_model(position)
    tokens = random_tokens(103)
    length = 16
    by_pos_sum, by_pos_n = np.zeros(length), np.zeros(length)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, length):
            window = tokens[start : start + length + 1].astype(np.int64)
            logits, _ = model(torch.tensor(window[None, :-1]))
            logp = F.log_softmax(logits[0].double(), -1)
            nll = -logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].numpy()
            total += nll.sum()
            count += len(nll)
            by_pos_sum[: len(nll)] += nll
            by_pos_n[: len(nll)] += 1
    out = evaluate_lengths(model, tokens, [length], progress=False, word_count=40, max_batch_tokens=32)
    rec = out["records"][0]
    assert rec["tokens"] == count == len(tokens) - 1
    assert rec["windows"] == math.ceil(102 / 16)
    assert rec["nll_sum"] == pytest.approx(total, rel=1e-5)
    assert rec["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert rec["word_ppl"] == pytest.approx(math.exp(total / 40), rel=1e-5)
    np.testing.assert_allclose(rec["loss_by_position"], by_pos_sum / by_pos_n, rtol=1e-4)


@pytest.mark.parametrize("position", ["alibi", "sinusoidal", "t5"])
def test_sliding_stride_one_matches_explicit_context(position):
    model = tiny_model(position)
    tokens = random_tokens(60)
    length = 12
    expected = [explicit_nll(model, tokens[max(0, t - length) : t], tokens[t]) for t in range(1, len(tokens))]
    out = evaluate_lengths(model, tokens, [length], mode="sliding", stride=1, progress=False, max_batch_tokens=50)
    rec = out["records"][0]
    assert rec["tokens"] == len(tokens) - 1
    assert rec["nll_sum"] == pytest.approx(sum(expected), rel=1e-5)
    assert rec["loss_by_position"] is None


def test_sliding_stride_is_between_nonoverlapping_and_exact_and_counts_each_token_once():
    model = tiny_model("sinusoidal")
    tokens = random_tokens(200)
    length = 16
    exact, approx, nonover = (
        evaluate_lengths(model, tokens, [length], mode=m, stride=s, progress=False)["records"][0]
        for m, s in (("sliding", 1), ("sliding", 5), ("nonoverlapping", 1))
    )
    assert exact["tokens"] == approx["tokens"] == nonover["tokens"] == 199
    # stride 5: target t >= 17 is predicted from the window that ends at it or up to 4 later
    expected = [explicit_nll(model, tokens[:t], tokens[t]) for t in range(1, length + 1)]
    for w in plan_windows(200, length, "sliding", 5)[1:]:
        for j in range(w.length - w.scored, w.length):
            t = w.start + j + 1
            expected.append(explicit_nll(model, tokens[w.start : t], tokens[t]))
    assert approx["nll_sum"] == pytest.approx(sum(expected), rel=1e-5)


@pytest.mark.parametrize("n,length,stride", [(2, 4, 1), (50, 7, 3), (64, 63, 63), (100, 10, 10), (11, 10, 4),
                                             (1000, 64, 17)])
def test_windows_cover_every_prediction_once(n, length, stride):
    for mode in ("nonoverlapping", "sliding"):
        covered = []
        for w in plan_windows(n, length, mode, stride):
            assert 1 <= w.scored <= w.length <= length and w.start >= 0 and w.start + w.length <= n - 1
            covered += range(w.start + w.length - w.scored + 1, w.start + w.length + 1)
        assert covered == list(range(1, n))


def test_batching_does_not_change_results_and_lengths_score_the_same_tokens():
    model = tiny_model("alibi")
    tokens = torch.tensor(random_tokens(300).astype(np.int64))
    small = evaluate_lengths(model, tokens, [8, 32, 100], max_batch_tokens=1, progress=False)
    large = evaluate_lengths(model, tokens, [8, 32, 100], max_batch_tokens=10_000, progress=False)
    for a, b in zip(small["records"], large["records"]):
        assert a["tokens"] == b["tokens"] == 299
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)
    assert [r["length"] for r in small["records"]] == [8, 32, 100]
    assert small["split_tokens"] == 300


def test_model_mode_is_restored_and_inputs_checked():
    model = tiny_model("learned").train()
    tokens = random_tokens(100)
    evaluate_lengths(model, tokens, [16], progress=False)
    assert model.training
    with pytest.raises(UserError, match="stop at 64"):
        evaluate_lengths(model, tokens, [128], progress=False)
    with pytest.raises(UserError, match="mode"):
        evaluate_lengths(model, tokens, [16], mode="overlap", progress=False)
    with pytest.raises(UserError, match="stride"):
        evaluate_lengths(model, tokens, [16], mode="sliding", stride=17, progress=False)
    with pytest.raises(UserError, match="at least 2 tokens"):
        evaluate_lengths(model, tokens[:1], [16], progress=False)


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    """A prepared byte-level corpus and a checkpoint of an untrained model that claims train_len 16."""
    from alibi_lm.checkpoint import save_model_checkpoint
    from alibi_lm.data import prepare
    from alibi_lm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i * 7 % 13}\n" for i in range(400)))
    prepare(str(root / "corpus.txt"), root / "data", tokenizer="bytes", progress=False)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=2, position="alibi"))
    save_model_checkpoint(root / "ckpt", model, train_len=16, tokenizer=Tokenizer.bytes())
    return root / "ckpt", root / "data"


def test_evaluate_command_writes_results_and_table(checkpoint_and_data, tmp_path, capsys):
    import json

    from alibi_lm.cli import main
    from alibi_lm.data import load_tokens, read_meta

    ckpt, data = checkpoint_and_data
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(ckpt), "--data", str(data), "--lengths", "16,64", "--mode", "both", "--stride", "8",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nonoverlapping" in printed and "sliding window (stride 8)" in printed and "word-level" in printed
    results = json.loads(out.read_text())
    assert results["format"] == "alibi-lm-eval" and results["train_len"] == 16 and results["split"] == "test"
    assert results["model"]["position"] == "alibi" and results["checkpoint"] == str(ckpt)
    assert [(e["mode"], e["length"], e["stride"]) for e in results["evaluations"]] == [
        ("nonoverlapping", 16, 16), ("nonoverlapping", 64, 64), ("sliding", 16, 8), ("sliding", 64, 8)]
    test = load_tokens(data, "test")
    assert all(e["tokens"] == len(test) - 1 for e in results["evaluations"])
    words = read_meta(data)["splits"]["test"]["words"]
    first = results["evaluations"][0]
    assert first["word_ppl"] == pytest.approx(math.exp(first["nll_sum"] / words))
    assert len(first["loss_by_position"]) == 16
    # the same numbers as the library call on the same tokens
    model = tiny_ckpt_model(ckpt)
    direct = evaluate_lengths(model, test, [64], progress=False)["records"][0]
    assert results["evaluations"][1]["nll_sum"] == pytest.approx(direct["nll_sum"], rel=1e-6)


def tiny_ckpt_model(path):
    from alibi_lm.checkpoint import load_checkpoint

    return load_checkpoint(path).model


def test_evaluate_command_defaults_and_errors(checkpoint_and_data, capsys):
    from alibi_lm.cli import main

    ckpt, data = checkpoint_and_data
    assert main(["evaluate", str(ckpt), "--data", str(data), "--split", "valid", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for n in (16, 32, 64, 128, 256):  # L..16L
        assert f" {n}" in printed.splitlines()[1]
    assert main(["evaluate", str(ckpt), "--no-progress"]) == 2  # no run config to find the data in
    assert "pass --data" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--data", str(data), "--lengths", "a,b"]) == 2
    assert main(["evaluate", str(data), "--data", str(data)]) == 2


@pytest.mark.parametrize("args, message", [
    (["--lengths", "infk"], "--lengths must be comma-separated integers"),
    (["--max-tokens", "-5"], "--max-tokens must be a positive integer"),
    (["--batch-tokens", "0"], "--batch-tokens must be a positive integer"),
    (["--stride", "0"], "--stride must be a positive integer"),
    (["-o", "."], "is a directory"),
    (["--lengths", ""], "--lengths must be positive integers"),
    (["--lengths", "100000000000"], "longer than the"),
    (["--max-tokens", "1"], "evaluate at least 2 tokens (--max-tokens)"),
])
def test_evaluate_command_bad_options_fail_before_evaluating(checkpoint_and_data, capsys, args, message):
    from alibi_lm.cli import main

    ckpt, data = checkpoint_and_data
    assert main(["evaluate", str(ckpt), "--data", str(data), "--no-progress", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_evaluate_command_notes_a_stride_longer_than_a_length(checkpoint_and_data, capsys):
    from alibi_lm.cli import main

    ckpt, data = checkpoint_and_data
    assert main(["evaluate", str(ckpt), "--data", str(data), "--no-progress", "--max-tokens", "300",
                 "--mode", "sliding", "--stride", "40", "--lengths", "16,64"]) == 0
    assert "note: --stride 40 is longer than length 16;" in capsys.readouterr().err


def test_evaluate_command_protects_files_and_checks_its_inputs(checkpoint_and_data, tmp_path, capsys):
    import json

    from alibi_lm.cli import main
    from alibi_lm.data import prepare

    ckpt, data = checkpoint_and_data
    base = ["evaluate", str(ckpt), "--data", str(data), "--no-progress", "--max-tokens", "300"]

    def fails(args, message):
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    # -o never replaces a file that is not an earlier results file: here a checkpoint's own metadata
    meta = ckpt / "meta.json"
    before = meta.read_bytes()
    fails(["-o", str(meta)], "is not an alibi-lm results file")
    assert meta.read_bytes() == before
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    fails(["-o", str(blocker / "eval.json")], "is a file, not a folder")
    # an earlier results file is replaced
    out = tmp_path / "eval.json"
    assert main(base + ["--lengths", "16", "-o", str(out)]) == 0
    assert main(base + ["--lengths", "32", "-o", str(out)]) == 0
    assert [e["length"] for e in json.loads(out.read_text())["evaluations"]] == [32]
    # lengths the evaluated tokens cannot fill are dropped with a note, the others evaluated
    capsys.readouterr()
    assert main(base + ["--lengths", "16,5000"]) == 0
    captured = capsys.readouterr()
    assert "skipping lengths 5000" in captured.err and " 16" in captured.out

    # a checkpoint given as data, and data made with another tokenizer, are one line each
    fails(["--data", str(ckpt)], "is a model checkpoint, not a prepared data directory")
    (tmp_path / "words.txt").write_text("".join(f"a b c d {i % 5}\n" for i in range(200)))
    prepare(str(tmp_path / "words.txt"), tmp_path / "words", tokenizer="word", progress=False)
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "words"), "--no-progress"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    (tmp_path / "words" / "tokenizer.json").unlink()  # a hand-made data folder: meta.json is all there is
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "words"), "--no-progress"]) == 2
    assert "another tokenizer (word," in capsys.readouterr().err


def test_default_lengths_stop_at_a_learned_models_last_position(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint
    from alibi_lm.cli import main
    from alibi_lm.data import prepare
    from alibi_lm.tokenizer import Tokenizer

    (tmp_path / "c.txt").write_text("".join(f"line {i}: some words\n" for i in range(300)))
    prepare(str(tmp_path / "c.txt"), tmp_path / "data", tokenizer="bytes", progress=False)
    model = TransformerLM(ModelConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=2, position="learned",
                                      max_len=64))
    save_model_checkpoint(tmp_path / "ck", model, train_len=16, tokenizer=Tokenizer.bytes())
    assert main(["evaluate", str(tmp_path / "ck"), "--data", str(tmp_path / "data"), "--no-progress"]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert " 64" in header and " 128" not in header


def test_sliding_cost_is_said_before_and_progress_is_plain_lines_in_a_log(checkpoint_and_data, capsys):
    """`evaluate --mode both` at stride 1 took 23.5 minutes with nothing said beforehand (issue 16): the
    tokens it reads are printed first, a cheaper stride is suggested, and progress written to a file
    (not a terminal) is a few plain lines with the time left, not a tqdm redraw per batch."""
    from alibi_lm.cli import main
    from alibi_lm.data import load_tokens
    from alibi_lm.evaluate import forward_tokens, plan_windows

    ckpt, data = checkpoint_and_data
    n = len(load_tokens(data, "test"))
    assert main(["evaluate", str(ckpt), "--data", str(data), "--lengths", "64", "--mode", "sliding"]) == 0
    err = capsys.readouterr().err
    sliding = forward_tokens(n, 64, "sliding", 1)
    assert sliding == sum(w.length for w in plan_windows(n, 64, "sliding", 1)) > 30 * (n - 1)
    assert f"reads {sliding:,} tokens" in err and "--stride 8 reads" in err, err
    progress = [line for line in err.splitlines() if line.startswith("sliding L=64")]
    assert 1 <= len(progress) <= 3 and "done in" in progress[-1] and "\r" not in err, err


@pytest.mark.parametrize("n_tokens, length, mode, stride", [(2, 5, "sliding", 1), (100, 16, "sliding", 1),
                                                            (100, 16, "sliding", 5), (101, 16, "sliding", 16),
                                                            (1000, 64, "nonoverlapping", 1), (17, 16, "sliding", 3)])
def test_forward_tokens_is_the_planned_windows_length(n_tokens, length, mode, stride):
    from alibi_lm.evaluate import forward_tokens, plan_windows

    assert forward_tokens(n_tokens, length, mode, stride) == sum(
        w.length for w in plan_windows(n_tokens, length, mode, stride))


def test_an_unknown_split_lists_the_splits(checkpoint_and_data, capsys):
    from alibi_lm.cli import main

    ckpt, data = checkpoint_and_data
    assert main(["evaluate", str(ckpt), "--data", str(data), "--split", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train, valid, test" in err, err


def test_evaluate_records_the_tolerance_and_refuses_a_bad_one(checkpoint_and_data, tmp_path, capsys):
    import json

    from alibi_lm.cli import main

    ckpt, data = checkpoint_and_data
    out = tmp_path / "e.json"
    assert main(["evaluate", str(ckpt), "--data", str(data), "--lengths", "16", "--tolerance", "1e-4",
                 "-o", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    # on the CPU no bounded kernel runs (SDPA is exact): the share read is unknown, not made up
    assert results["attn_tolerance"] == 1e-4 and results["evaluations"][0]["tiles_visited_share"] is None
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", str(data), "--tolerance", "1.5"]) == 2
    assert "attn_tolerance must be in [0, 1)" in capsys.readouterr().err
