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
