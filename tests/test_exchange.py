"""The exchanges alone, on gloo CPU ranks: against a gather+slice reference, round trips, byte counts."""

import pytest

import _dist_cases as cases

LENGTHS = {
    2: [(3, 3), (4, 1), (5, 0)],
    4: [(2, 2, 2, 2), (3, 2, 2, 1), (1, 1, 1, 0), (6, 0, 0, 0)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_seq_to_head_matches_gather_reference(pools, world):
    pool = pools(4)
    for lengths in LENGTHS[world]:
        out = pool.run(cases.exchange_matches_gather_reference, world, lengths)
        assert out[:world] == [True] * world, lengths


@pytest.mark.parametrize("world", [2, 4])
def test_round_trip_is_identity(pools, world):
    pool = pools(4)
    for lengths in LENGTHS[world]:
        out = pool.run(cases.exchange_round_trip, world, lengths)
        assert out[:world] == [True] * world, lengths


@pytest.mark.parametrize("world", [2, 4])
def test_producer_written_send_buffers_match_the_packed_ones(pools, world):
    pool = pools(4)
    for lengths in LENGTHS[world]:
        for heads in (world * 2, world * 2 - 1):  # even, and padded to a multiple of the degree
            out = pool.run(cases.exchange_producer_paths, world, lengths, heads)
            assert out[:world] == [True] * world, (lengths, heads)


def test_row_messages_round_trip():
    # the tiered route's row messages: exact as they are, within fp8 rounding (3 mantissa bits: < 1/16 of each
    # head's largest value) with 8-bit rows; the carried indices survive both
    import torch

    from cocodiff.exchange.tiered import _pack_rows, _unpack_rows

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([[3, 0, 7], [1, 2, 5]])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        picked = (torch.randn(2, 3, 4 * 8, generator=g) * 10).to(dtype)
        for fp8 in (None, 8):
            msg = _pack_rows(picked, rows, fp8)
            values, got = _unpack_rows(msg, picked.shape[-1], dtype, True, fp8)
            assert torch.equal(got, rows), (dtype, fp8)
            if fp8 is None:
                assert msg.dtype == dtype and torch.equal(values, picked)
            else:
                assert msg.dtype == torch.uint8 and msg.shape[-1] == 32 + 4 * 4 + 4
                amax = picked.float().view(2, 3, 4, 8).abs().amax(-1, keepdim=True)
                err = (values.float() - picked.float()).view(2, 3, 4, 8).abs()
                assert (err <= amax / 16 + 1e-6).all(), (dtype, (err / amax).max())
