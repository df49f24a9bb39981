import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alibi_lm import alibi_slopes
from alibi_lm.positions import mpt_alibi_slopes, sinusoid_table, t5_buckets


def paper_rule(n: int) -> list[float]:
    """The paper's rule written independently: exponents of 2 instead of slope lists."""
    c = 2 ** int(math.floor(math.log2(n)))
    exponents = [-8 * h / c for h in range(1, c + 1)]
    exponents += [-8 * h / (2 * c) for h in range(1, 2 * c + 1, 2)][: n - c]
    return [2.0**e for e in exponents]


def test_eight_heads_are_exact_powers_of_two():
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(8).dtype == torch.float32


def test_sixteen_heads_start_at_two_to_the_minus_half():
    slopes = alibi_slopes(16)
    assert slopes[0].item() == pytest.approx(2**-0.5, rel=1e-7)
    assert slopes[-1].item() == 2**-8


def test_twelve_heads_follow_the_paper_example():
    expected = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n", list(range(1, 65)))
def test_every_head_count_follows_the_rule(n):
    slopes = alibi_slopes(n)
    assert slopes.shape == (n,)
    torch.testing.assert_close(slopes, torch.tensor(paper_rule(n), dtype=torch.float32), rtol=1e-7, atol=0)
    assert bool(((slopes > 0) & (slopes < 1)).all())
    assert len(set(slopes.tolist())) == n, "slopes of different heads must differ"
    if n & (n - 1) == 0:
        assert bool((slopes[1:] < slopes[:-1]).all())


@pytest.mark.parametrize("n", [6, 12, 20, 24, 40])
def test_non_powers_of_two_start_with_the_lower_power_slopes(n):
    lower = 2 ** int(math.log2(n))
    assert alibi_slopes(n)[:lower].tolist() == alibi_slopes(lower).tolist()


@pytest.mark.parametrize("bad", [0, -3, 2.0, "8", True])
def test_bad_head_counts_are_value_errors(bad):
    with pytest.raises(ValueError, match="positive whole number of heads"):
        alibi_slopes(bad)


@pytest.mark.parametrize("max_bias", [4.0, 8.0, 16.0])
def test_mpt_construction_gives_the_paper_slopes_for_every_head_count(max_bias):
    # MPT rounds 12 up to 16 and takes 16-head slopes 2, 4, ..., 16 first, then 1, 3, 5, 7
    expected = [2.0 ** (-max_bias * h / 16) for h in (2, 4, 6, 8, 10, 12, 14, 16, 1, 3, 5, 7)]
    torch.testing.assert_close(mpt_alibi_slopes(12, max_bias), torch.tensor(expected), rtol=1e-7, atol=0)
    for n in range(1, 129):
        assert mpt_alibi_slopes(n, max_bias).tolist() == alibi_slopes(n, max_bias).tolist()
    assert alibi_slopes(8, 16.0).tolist() == [4.0**-h for h in range(1, 9)]


def test_sinusoid_table_is_sin_then_cos_of_position_times_frequency():
    table = sinusoid_table(torch.tensor([0, 1, 7]), 8)
    assert table.shape == (3, 8)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    freq = 10000 ** (-torch.arange(4) / 3)
    torch.testing.assert_close(table[2], torch.cat([torch.sin(7 * freq), torch.cos(7 * freq)]))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000))
def test_t5_buckets_are_monotone_and_bounded(distance):
    rel = torch.tensor([-distance, -(distance + 1)])
    buckets = t5_buckets(rel, num_buckets=32, max_distance=128, causal=True)
    assert 0 <= buckets[0] <= buckets[1] <= 31
    if distance < 16:
        assert buckets[0] == distance
    if distance >= 128:
        assert buckets[0] == 31


