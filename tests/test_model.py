import math

import pytest
import torch

from alibi_lm import POSITIONS, ModelConfig, TransformerLM, alibi_slopes
from alibi_lm.errors import UserError
from alibi_lm.model import perplexity, token_nll

RELATIVE = ["alibi", "rotary", "t5", "none"]


def tiny(position: str = "alibi", **overrides) -> TransformerLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, position=position, max_len=64)
    cfg.update(overrides)
    return TransformerLM(ModelConfig(**cfg))


def randomize_t5(model: TransformerLM) -> None:
    """T5's bias table starts at zero; give it values so that tests exercise it."""
    if model.cfg.position == "t5":
        torch.nn.init.normal_(model.position.table.weight, std=0.5)


@pytest.mark.parametrize("position", list(POSITIONS))
def test_tiny_model_overfits_a_fixed_batch(position):
    model = tiny(position)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (4, 33), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, first = model(inputs, targets)
    for _ in range(60):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first.item() == pytest.approx(math.log(40), rel=0.05)  # GPT-2 init starts near uniform
    assert loss.item() < 0.35 * first.item()


@pytest.mark.parametrize("position", list(POSITIONS))
def test_kv_cache_decoding_matches_full_forward(position):
    model = tiny(position).eval()
    randomize_t5(model)
    length = 64 if position == "learned" else 150  # the others go far past any training length
    tokens = torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(batch=2, capacity=8)  # small on purpose: the cache must grow
        pieces = [model(tokens[:, :10], cache=cache)[0]]  # prefill, then a chunk, then one by one
        pieces.append(model(tokens[:, 10:15], cache=cache)[0])
        pieces += [model(tokens[:, i : i + 1], cache=cache)[0] for i in range(15, length)]
    assert cache.length == length
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position", ["alibi", "sinusoidal"])
def test_logits_from_returns_the_tail_of_the_full_forward(position):
    model = tiny(position).eval()
    tokens = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(tokens)
        tail, loss = model(tokens, targets[:, 13:], logits_from=13)
    assert tail.shape == (3, 7, 40)
    torch.testing.assert_close(tail, full[:, 13:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, token_nll(full[:, 13:], targets[:, 13:]).mean())
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="logits_from must be in"):
            model(tokens, logits_from=bad)


def test_learned_positions_refuse_to_extrapolate():
    model = tiny("learned", max_len=16).eval()
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="cover positions 0..15.*cannot extrapolate"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(1, 16)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="position 16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("position", list(POSITIONS))
def test_changing_future_tokens_leaves_earlier_logits_unchanged(position):
    model = tiny(position).eval()
    randomize_t5(model)
    tokens = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 40
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("position", RELATIVE)
def test_left_padded_batch_equals_sequences_run_alone(position):
    model = tiny(position).eval()
    randomize_t5(model)
    gen = torch.Generator().manual_seed(4)
    short, long = torch.randint(1, 40, (1, 6), generator=gen), torch.randint(1, 40, (1, 11), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        padded, _ = model(batch, padding_mask=mask)
        alone_short, _ = model(short)
        alone_long, _ = model(long)
        # continue both with the cache: one more token each, still padded
        cache = model.new_cache(2, 16)
        model(batch, cache=cache, padding_mask=mask)
        step = torch.tensor([[7], [9]])
        next_padded, _ = model(step, cache=cache, padding_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        next_short, _ = model(torch.cat([short, step[:1]], 1))
    torch.testing.assert_close(padded[0, 5:], alone_short[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1], alone_long[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(next_padded[0, 0], next_short[0, -1], rtol=1e-4, atol=1e-5)


def test_padding_needs_a_relative_method():
    model = tiny("sinusoidal").eval()
    with pytest.raises(ValueError, match="relative position method"):
        model(torch.ones(1, 4, dtype=torch.long), padding_mask=torch.ones(1, 4))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(d_model=30), "divisible by model.n_heads"),
        (dict(n_kv_heads=3), "multiple of model.n_kv_heads"),
        (dict(position="alibii"), r"unknown model.position 'alibii' \(did you mean \"alibi\"\?\); valid: alibi, "
                                  "sinusoidal, learned, rotary, t5, none"),
        (dict(norm="batchnorm"), "unknown model.norm"),
        (dict(activation="relu"), "unknown model.activation"),
        (dict(n_layers=0), "model.n_layers must be a positive integer"),
        (dict(dropout=1.5), "model.dropout"),
    ],
)
def test_invalid_configs_raise_value_error_at_construction(overrides, message):
    overrides.setdefault("position", "alibi")
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = ModelConfig(n_heads=8, position="rotary")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match='did you mean "n_heads"'):
        ModelConfig.from_dict({"n_head": 8})


def test_alibi_model_uses_paper_slopes_and_has_no_position_parameters():
    model = tiny("alibi", n_heads=8, n_kv_heads=None, d_model=64)
    assert model.position.slopes.tolist() == alibi_slopes(8).tolist()
    assert not any("position" in name for name, _ in model.named_parameters())
    assert "position.slopes" in model.state_dict()


def test_trainable_slopes_receive_gradients():
    model = tiny("alibi", trainable_slopes=True)
    _, loss = model(torch.randint(0, 40, (2, 12)), torch.randint(0, 40, (2, 12)))
    loss.backward()
    assert model.position.slopes.grad is not None and bool(model.position.slopes.grad.abs().gt(0).all())


def test_gpt2_init_scales_residual_projections():
    model = tiny("alibi", n_layers=8, d_model=128, n_kv_heads=None)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("activation,norm", [("swiglu", "rmsnorm"), ("gelu_tanh", "layernorm")])
def test_other_block_options_build_and_decode(activation, norm):
    model = tiny("alibi", activation=activation, norm=norm, bias=False, embed_norm=True, tie_embeddings=False).eval()
    tokens = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(1, 9)
        steps = torch.cat([model(tokens[:, i : i + 1], cache=cache)[0] for i in range(9)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
    assert model.lm_head.weight is not model.embed.weight


def test_token_nll_is_per_token_cross_entropy():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    nll = token_nll(logits, targets)
    expected = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(nll, expected)


def test_perplexity_is_exp_of_the_mean_nll_and_infinite_past_float_range():
    assert perplexity(math.log(123.5)) == pytest.approx(123.5)
    assert perplexity(0.0) == 1.0
    assert perplexity(710.0) == math.inf


@pytest.mark.parametrize("offset, n_queries", [(0, 37), (20, 9)])
def test_t5_attention_in_query_chunks_equals_one_bias(offset, n_queries):
    from alibi_lm import positions
    from alibi_lm.model import BIAS_CHUNK_ELEMENTS, attend

    t5 = positions.T5Bias(n_heads=4).double()
    torch.nn.init.normal_(t5.table.weight, std=0.5)
    gen = torch.Generator().manual_seed(n_queries)
    q = torch.randn(2, 4, n_queries, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 4, offset + n_queries, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    results = []
    for limit in (BIAS_CHUNK_ELEMENTS, 5 * 4 * (offset + n_queries)):  # one chunk, then 5 rows
        t5.zero_grad()
        out = attend(q, k, v, t5, offset, "sdpa", chunk_elements=limit)
        out.square().sum().backward()
        results.append((out.detach(), t5.table.weight.grad.clone()))
    (whole, whole_grad), (chunked, chunked_grad) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("field", ["attn_dropout", "act_dropout"])
def test_attention_and_activation_dropout_act_in_training_only(field):
    """The paper's WikiText-103 recipe adds attention and activation dropout (0.1 each) to dropout 0.3."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, n_layers=2, d_model=32, n_heads=4, position="alibi")
    plain = TransformerLM(ModelConfig(**cfg))
    dropped = TransformerLM(ModelConfig(**cfg, **{field: 0.5}))
    dropped.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dropped.eval()(tokens)[0], plain.eval()(tokens)[0])
        dropped.train()
        torch.manual_seed(5)
        a = dropped(tokens)[0]
        torch.manual_seed(5)
        b = dropped(tokens)[0]
        c = dropped(tokens)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, plain.eval()(tokens)[0])
    with pytest.raises(UserError, match=f"model.{field} must be in"):
        ModelConfig(**cfg, **{field: 1.0}).validate()
