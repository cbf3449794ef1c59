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


def test_rows_of_finished_requests_make_room_before_a_forced_catch_up():
    """Rows of requests that finished while their batch skipped are dropped, without being
    combined, when the kept rows would otherwise fill the buffers; a live request's rows stay."""
    kept = SkippedTokens(capacity=24)  # room for 12 kept rows
    positions = [10, 40, 70]
    for step in range(3):
        assert kept.stash_decode(["a", "b", "c"], *_round(step, positions))
        positions = [p + 1 for p in positions]
    kept.forget({"a"})  # "b" and "c" finished
    assert kept.rows() == 9 and kept.rows_dropped == 0  # nothing pruned while there is room
    assert kept.has_room(3)
    assert kept.has_room(9)  # 9 + 9 > 12: the 6 rows of "b" and "c" go first
    assert kept.rows() == 3 and kept.rows_dropped == 6
    assert not kept.has_room(10)
    combined: list[int] = []
    kept.materialize(lambda raw: combined.append(raw.shape[0]) or _combine(raw))
    assert combined == [3] and set(kept.pending) == {"a"} and kept.pending["a"].next_position == 13
    assert kept.pending["a"].cat()[1].tolist() == [10, 11, 12]


def test_materialize_combines_only_the_rows_of_running_requests():
    kept = SkippedTokens(capacity=1024)
    positions = [5, 9]
    for step in range(4):
        assert kept.stash_decode(["a", "b"], *_round(step, positions))
        positions = [p + 1 for p in positions]
    kept.forget({"b"})
    combined: list[int] = []
    kept.materialize(lambda raw: combined.append(raw.shape[0]) or _combine(raw))
    assert combined == [4] and set(kept.pending) == {"b"} and kept.rows_dropped == 4
    assert kept.pending["b"].cat()[1].tolist() == [9, 10, 11, 12]


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


def _catch_up_round(kept: SkippedTokens, req_ids, lengths, first_positions):
    """A round whose call 1 runs for a prefill chunk: the batch's rows (request i: ``lengths[i]``
    rows from ``first_positions[i]``) as the proposer receives them; returns what
    ``RadarProposer._keep_rows_through_catch_up`` answers and the tensors it read."""
    from radar_vllm.vllm.proposer import RadarProposer

    starts = torch.tensor([0, *lengths]).cumsum(0)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(first_positions, lengths)])
    raw = torch.randn(int(starts[-1]), 2 * HIDDEN, generator=torch.Generator().manual_seed(len(positions)))
    next_tokens = torch.tensor([100 + i for i in range(len(req_ids))])
    cad = SimpleNamespace(query_start_loc_cpu=starts, slot_mapping=positions + 1000, batch_size=lambda: len(req_ids))
    proposer = SimpleNamespace(skipped=kept, input_ids=torch.zeros(1, dtype=torch.int32),
                               model_runner=SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(req_ids))))
    answer = RadarProposer._keep_rows_through_catch_up(proposer, next_tokens, positions, raw, cad)
    return answer, next_tokens, raw, starts


def test_a_catch_up_round_for_a_prefill_chunk_keeps_the_kept_rows_and_this_rounds_row_after_them():
    kept = SkippedTokens(capacity=1024)
    for step in range(2):  # two skipped decode rounds of requests a, b
        kept.stash_decode(["a", "b"], *_round(step, [10 + step, 20 + step]))
    # a prefill chunk arrives (request p, 5 rows) while a and b decode one token each
    answer, next_tokens, raw, starts = _catch_up_round(kept, ["a", "p", "b"], [1, 5, 1], [12, 0, 22])
    assert answer and kept.rounds_kept_through_catch_up == 1
    kept.materialize(_combine)
    assert set(kept.pending) == {"a", "b"}  # p's rows go through call 1 now: nothing kept for it
    for req_id, row, first in (("a", 0, 10), ("b", 2, 20)):
        tokens, positions, hidden, slots = kept.pending[req_id].cat()
        assert positions.tolist() == [first, first + 1, first + 2] and slots.tolist() == [p + 1000 for p in positions]
        assert int(tokens[-1]) == int(next_tokens[row])  # the drafter row: the sampled token ...
        assert torch.equal(hidden[-1], _combine(raw[starts[row]:starts[row] + 1])[0])  # ... the target's state
        assert kept.pending[req_id].next_position == first + 3
    # the same round where b verified drafts (several rows): every kept row goes through call 1
    kept = SkippedTokens(capacity=1024)
    kept.stash_decode(["a", "b"], *_round(0, [10, 20]))
    assert not _catch_up_round(kept, ["a", "p", "b"], [1, 5, 3], [11, 0, 21])[0]
    assert kept.rows() == 2
    # nor when the kept rows would fill half the drafter's buffers
    kept = SkippedTokens(capacity=8)
    kept.stash_decode(["a", "b"], *_round(0, [10, 20]))
    kept.stash_decode(["a", "b"], *_round(1, [11, 21]))
    assert not _catch_up_round(kept, ["a", "p", "b"], [1, 1, 1], [12, 0, 22])[0]
    # nothing kept: nothing to keep through
    assert not _catch_up_round(SkippedTokens(capacity=1024), ["a", "p"], [1, 5], [12, 0])[0]
