import pytest
import torch

from alibi_lm.errors import UserError
from alibi_lm.generate import _sample, filter_logits, generate
from alibi_lm.model import ModelConfig, TransformerLM


def tiny_model(position: str = "alibi", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=41, n_layers=2, d_model=32, n_heads=4, position=position, max_len=48,
                      attention_backend="sdpa")
    model = TransformerLM(cfg)
    with torch.no_grad():  # sharper, position-dependent predictions than an untrained init
        for p in model.parameters():
            p.mul_(6.0)
    return model.eval()


PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]


@pytest.mark.parametrize("position", ["alibi", "sinusoidal", "rotary", "t5", "none"])
def test_greedy_with_cache_equals_argmax_of_full_forward(position):
    model = tiny_model(position)
    sequence = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(torch.tensor([sequence]))
            sequence.append(int(logits[0, -1].argmax()))
    new = generate(model, [PROMPTS[0]], max_new_tokens=30, temperature=0)
    assert new == [sequence[len(PROMPTS[0]) :]]


@pytest.mark.parametrize("position", ["alibi", "rotary", "t5", "none", "sinusoidal"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_left_padded_batch_equals_one_by_one(position, temperature):
    model = tiny_model(position)
    batch = generate(model, PROMPTS, max_new_tokens=20, temperature=temperature, top_k=20, seed=7)
    alone = [generate(model, [p], max_new_tokens=20, temperature=temperature, top_k=20, seed=7 + i)[0]
             for i, p in enumerate(PROMPTS)]
    assert batch == alone
    assert all(len(t) == 20 for t in batch)


def test_generation_runs_past_the_learned_table_only_for_relative_methods():
    model = tiny_model("alibi")
    out = generate(model, [[1, 2, 3]], max_new_tokens=100, temperature=0.8, seed=1)  # past max_len=48
    assert len(out[0]) == 100 and all(0 <= t < 41 for t in out[0])
    with pytest.raises(UserError, match="positions stop at 48"):
        generate(tiny_model("learned"), [[1, 2, 3]], max_new_tokens=100)


def test_seed_streaming_and_stop_token():
    model = tiny_model("alibi")
    a = generate(model, PROMPTS, max_new_tokens=15, seed=3)
    streamed = []
    b = generate(model, PROMPTS, max_new_tokens=15, seed=3, on_token=streamed.append)
    c = generate(model, PROMPTS, max_new_tokens=15, seed=4)
    assert a == b and a != c
    assert [list(row) for row in zip(*streamed)] == a
    stop = a[0][4]
    d = generate(model, PROMPTS, max_new_tokens=15, seed=3, stop_id=stop)
    assert d[0] == a[0][: a[0].index(stop) + 1]
    for row, full in zip(d[1:], a[1:]):
        assert row == (full[: full.index(stop) + 1] if stop in full else full)


def test_filters_and_sampling_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # nucleus 0.7: 0.5 alone is not enough, 0.5 + 0.3 is; the rest is cut
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0]).tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True, False, False, False]
    n = 20000
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = _sample(logits.expand(n, 4), generators, 1.0, None, None)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015)
    greedy = _sample(logits, generators[:1], 0.0, None, None)
    assert greedy.tolist() == [0]


def test_bad_arguments_are_user_errors():
    model = tiny_model("alibi")
    for kwargs in ({"temperature": -1}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_k": 0},
                   {"top_p": 1.5}, {"max_new_tokens": -1}, {"seed": -1}, {"seed": 2**64}):
        args = {"max_new_tokens": 3, **kwargs}
        with pytest.raises(UserError):
            generate(model, [[1]], **args)
    with pytest.raises(UserError, match="vocabulary"):
        generate(model, [[99]], max_new_tokens=1)
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [[]], max_new_tokens=1)


def test_the_cache_grows_instead_of_reserving_max_new_tokens(monkeypatch):
    """"Generate until the end-of-text token" asks for a huge max_new_tokens; only what is used is allocated."""
    model = tiny_model("alibi")
    capacities = []
    original = type(model).new_cache

    def recording(self, batch, capacity, *args, **kwargs):
        capacities.append(capacity)
        return original(self, batch, capacity, *args, **kwargs)

    monkeypatch.setattr(type(model), "new_cache", recording)
    stop = generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)[0][-1]
    out = generate(model, [[1, 2, 3]], max_new_tokens=10**12, temperature=0, stop_id=stop)
    assert out[0][-1] == stop and len(out[0]) <= 5
    assert capacities[-1] <= 3 + 1024


def test_generate_command_streams_text(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint
    from alibi_lm.cli import main
    from alibi_lm.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=2, position="alibi"))
    save_model_checkpoint(tmp_path / "ckpt", model, train_len=16, tokenizer=Tokenizer.bytes())
    args = ["generate", str(tmp_path / "ckpt"), "--prompt", "héllo", "--max-new-tokens", "40", "--temperature", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    expected = generate(model, [list("héllo".encode())], max_new_tokens=40, temperature=0)[0]
    assert printed == "héllo" + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert main([*args[:2], "--prompt", "x", "--top-p", "2"]) == 2
    for bad in (["--max-new-tokens", "-1"], ["--temperature", "nan"], ["--stop-at-eos"]):  # refused before the echo
        capsys.readouterr()
        assert main([*args[:2], "--prompt", "x", *bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
    assert main([*args[:2], "--prompt", "x", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "x\n"


def test_bf16_autocast_keeps_the_cache_in_the_autocast_dtype():
    # what runs on CUDA (bf16 autocast of an fp32 model), exercised with CPU autocast
    model = tiny_model("alibi")
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0, autocast_dtype=torch.bfloat16)
    assert [len(t) for t in out] == [12, 12, 12]
    exact = generate(model, PROMPTS, max_new_tokens=12, temperature=0, autocast_dtype=None)
    # bf16 may flip a near-tie late in a sequence; the first greedy tokens agree
    assert [t[:2] for t in out] == [t[:2] for t in exact]


def test_the_largest_seeds_are_accepted():
    model = tiny_model("alibi")
    assert len(generate(model, [[1]], max_new_tokens=2, seed=2**64 - 1)[0]) == 2
    assert len(generate(model, [[1], [2]], max_new_tokens=2, seed=2**64 - 2)) == 2


def test_generate_command_separates_a_word_prompt_from_the_first_new_word(tmp_path, capsys):
    from alibi_lm.checkpoint import save_model_checkpoint
    from alibi_lm.cli import main
    from alibi_lm.tokenizer import train_tokenizer

    tok = train_tokenizer("word", ["the cat sat on the mat", "a dog sat on a log"])
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2))
    save_model_checkpoint(tmp_path / "ckpt", model, train_len=8, tokenizer=tok)
    expected = generate(model, [tok.encode("the cat")], max_new_tokens=4, temperature=0)[0]
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "the cat", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    continuation = tok.decode(expected)
    joined = "the cat" + ("" if continuation.startswith("\n") else " ") + continuation
    assert printed == joined + "\n"
