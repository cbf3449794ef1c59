"""The drafter's kept rows of skipped rounds: the per-batch fast path keeps what the per-request
path keeps, in order, and drops what it drops."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from radar_vllm.vllm.catch_up import SkippedTokens

HIDDEN = 4


def _combine(raw: torch.Tensor) -> torch.Tensor:  # stands in for the drafter's input layer
    return raw[:, :HIDDEN] * 2.0 + raw[:, HIDDEN:]


def _round(step: int, positions: list[int]):
    """One decode step of a batch: per request one token (row i = request i)."""
    batch = len(positions)
    generator = torch.Generator().manual_seed(step)
    return (torch.randint(3, 500, (batch,), generator=generator, dtype=torch.int32),
            torch.tensor(positions, dtype=torch.int64),
            torch.randn(batch, 2 * HIDDEN, generator=generator),
            torch.tensor(positions, dtype=torch.int64) + 1000)


def _stash_slow(kept: SkippedTokens, req_ids, tokens, positions, raw, slots) -> None:
    batch = len(req_ids)
    cad = SimpleNamespace(query_start_loc_cpu=torch.arange(batch + 1), slot_mapping=slots,
                          batch_size=lambda: batch)
    kept.stash(req_ids, cad, torch.arange(batch), tokens, positions, _combine(raw))


def test_batch_records_keep_what_per_request_rows_keep():
    slow, fast = SkippedTokens(capacity=1024), SkippedTokens(capacity=1024)
    req_ids = ["a", "b", "c"]
    positions = [7, 20, 3]
    for step in range(5):
        if step == 3:  # request "b" finished; the batch goes on with two
            req_ids, positions = ["a", "c"], [positions[0], positions[2]]
            for kept in (slow, fast):
                kept.forget({"a", "c"})
        tokens, pos, raw, slots = _round(step, positions)
        _stash_slow(slow, req_ids, tokens, pos, raw, slots)
        assert fast.stash_decode(req_ids, tokens, pos, raw, slots)
        positions = [p + 1 for p in positions]
    assert fast.rows() == slow.rows() + 3  # rows of "b" stay in the records until combined
    fast.materialize(_combine)
    assert not fast.records and fast.rows() == slow.rows() == 10
    assert set(fast.pending) == set(slow.pending) == {"a", "c"} and fast.rows_dropped == 3
    for req_id in ("a", "c"):
        for mine, theirs in zip(fast.pending[req_id].cat(), slow.pending[req_id].cat()):
            assert torch.equal(mine.to(theirs.dtype), theirs)
        assert fast.pending[req_id].next_position == slow.pending[req_id].next_position


def test_records_follow_per_request_rows_and_refuse_a_restart():
    kept = SkippedTokens(capacity=1024)
    tokens, pos, raw, slots = _round(0, [5, 9])
    _stash_slow(kept, ["a", "b"], tokens, pos, raw, slots)  # e.g. the first skip after a drafting round
    tokens, pos, raw, slots = _round(1, [6, 10])
    assert kept.stash_decode(["a", "b"], tokens, pos, raw, slots)
    # "b" restarted (preempted and recomputed): its position does not follow; nothing is kept
    tokens, pos, raw, slots = _round(2, [7, 3])
    assert not kept.stash_decode(["a", "b"], tokens, pos, raw, slots)
    with pytest.raises(RuntimeError, match="materialize"):
        _stash_slow(kept, ["a", "b"], tokens, pos, raw, slots)
    kept.materialize(_combine)
    _stash_slow(kept, ["a", "b"], tokens, pos, raw, slots)  # the per-request path drops b's stale rows
    assert kept.pending["a"].cat()[1].tolist() == [5, 6, 7]
    assert kept.pending["b"].cat()[1].tolist() == [3] and kept.rows_dropped == 2
