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


def test_compiled_row_pieces_match_eager():
    # V-Major's per-layer kernels compiled by inductor (C++ on CPU ranks, Triton on GPUs), as `compile_blocks`
    # runs them: the fp8 rows' message is byte-identical to the eager one at every row count (one automatic-dynamic
    # recompile, not one graph per count), and the change scores equal the eager ones to fp32 rounding
    from types import SimpleNamespace

    import torch
    from torch._dynamo.utils import counters

    from cocodiff import ParallelConfig
    from cocodiff.compiled import compiled_piece
    from cocodiff.exchange.tiered import _pack_rows, _unpack_rows
    from cocodiff.vmajor import change_scores

    torch._dynamo.reset()
    counters.clear()
    engine = SimpleNamespace(config=ParallelConfig(compile_blocks=True))

    def piece(fn):
        return compiled_piece(engine, fn, varying=True)

    g = torch.Generator().manual_seed(0)
    for k in (3, 5, 9):
        picked = (torch.randn(2, k, 4 * 8, generator=g) * 10).to(torch.bfloat16)
        rows = torch.randint(0, 16, (2, k), generator=g)
        want = _pack_rows(picked, rows, 8)
        got = _pack_rows(picked, rows, 8, piece)
        assert torch.equal(got, want), k
        values, carried = _unpack_rows(got, 32, torch.bfloat16, True, 8, piece)
        eager_values, _ = _unpack_rows(want, 32, torch.bfloat16, True, 8)
        assert torch.equal(values, eager_values) and torch.equal(carried, rows), k
    assert counters["stats"]["unique_graphs"] == 4  # (de)quantisation: static at 3 rows, dynamic from 5 on

    send = torch.randn(4, 6, 1, 2, 8, generator=g).to(torch.bfloat16)
    ref = torch.randn(4, 6, 1, 2, 8, generator=g).to(torch.bfloat16)
    far = torch.tensor([2, 3])
    for per_token in (True, False):
        want = change_scores(send, ref, far, per_token)
        got = compiled_piece(engine, change_scores)(send, ref, far, per_token)
        assert got.shape == ((6,) if per_token else (2, 6))
        torch.testing.assert_close(got, want, rtol=1e-2, atol=0)  # bf16 V - ref is not rounded when compiled
    torch._dynamo.reset()
