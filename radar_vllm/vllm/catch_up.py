"""The drafter's catch-up after rounds that did not draft (depth 0).

EAGLE-3's first draft call of a round reads every token the target processed in that step (one
row per token: the next token id, the target's hidden state, the position) and writes the
drafter's own KV cache at those positions. A round that does not draft skips that call, so the
drafter would later attend over holes. Instead, a skipped round keeps its first-call rows (already
shifted and combined by vLLM's own ``set_inputs_first_pass``) per request, and the next round that
drafts puts them in front of that request's rows: one first call then writes the drafter KV of the
skipped positions and of the new ones, so the drafts are those of a drafter that never skipped.

A run of skipped rounds in a settled batch (every request one new token per step) takes a faster
path: the round keeps the whole batch's rows as one record, straight from the target's outputs
(the sampled token, its position and slot, the target's hidden states not yet combined by the
drafter's input layer), with no per-request work; the records are combined and sorted per request
(:meth:`SkippedTokens.materialize`) only when a round drafts again.

A round the gate skips that carries a prefill chunk runs call 1 for the chunk's drafter KV (prompt
blocks are shared through the prefix cache). The other requests' kept rows stay kept: their row of
that round goes into the kept rows after them (call 1 computes it too, over the holes, and it is
computed again when they catch up), so a busy server does not push every kept row of the batch
through the drafter at each arrival, only when a round drafts again.

The rows are small (one hidden vector per token). They are dropped when the request is gone, and
when a request's positions restart (preemption recomputes it from its prompt), where they would
no longer be contiguous with the new rows. A catch-up that would not fit the drafter's input
buffers is dropped too (the drafter then reads stale KV there: fewer accepted drafts, same
outputs, since verification does not trust the drafter).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class SkippedRows:
    """First-call rows of one request's skipped rounds, oldest first."""

    input_ids: list[torch.Tensor]
    positions: list[torch.Tensor]
    hidden: list[torch.Tensor]
    slots: list[torch.Tensor]
    next_position: int  # position of the first row the next round must bring

    def __len__(self) -> int:
        return sum(part.shape[0] for part in self.input_ids)

    def cat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.cat(self.input_ids), torch.cat(self.positions), torch.cat(self.hidden),
                torch.cat(self.slots))


@dataclass
class DecodeRecord:
    """One skipped round of a batch in which every request had one new token: row i is request i's."""

    req_ids: tuple[str, ...]
    input_ids: torch.Tensor  # [batch] the tokens the target sampled
    positions: torch.Tensor  # [batch]
    raw_hidden: torch.Tensor  # [batch, num_aux * hidden] the target's hidden states, not combined
    slots: torch.Tensor  # [batch]


class SkippedTokens:
    """Per request id: the drafter rows its skipped rounds did not compute."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # rows the drafter's first call can take
        self.pending: dict[str, SkippedRows] = {}  # combined rows, per request
        self.records: list[DecodeRecord] = []  # later rows, per batch (after every pending row)
        self.record_rows = 0  # rows in ``records`` (counted as they come: asked every step)
        self.next_position: dict[str, int] = {}  # per request with kept rows: the next row's position
        self.rows_caught_up = 0  # statistics (tests, logs)
        self.rounds_kept_through_catch_up = 0  # catch-up rounds (prefill chunks) that kept the rows
        self.rows_dropped = 0

    def __bool__(self) -> bool:
        return bool(self.pending) or bool(self.records)

    def rows(self) -> int:
        """Rows kept in all."""
        return sum(len(entry) for entry in self.pending.values()) + self.record_rows

    def has_room(self, more: int) -> bool:
        """Whether ``more`` rows can join the kept ones while they fill at most half the drafter's
        buffers (the other half is the catch-up round's own rows)."""
        return self.rows() + more <= self.capacity // 2

    def forget(self, live_req_ids: Any) -> None:
        """Drop the rows of requests that are no longer running (in records: when they are combined)."""
        for req_id in [r for r in self.next_position if r not in live_req_ids]:
            del self.next_position[req_id]
            if req_id in self.pending:
                self.rows_dropped += len(self.pending.pop(req_id))

    def stash_decode(self, req_ids: Sequence[str], input_ids: torch.Tensor, positions: torch.Tensor,
                     raw_hidden: torch.Tensor, slots: torch.Tensor) -> bool:
        """Keep a skipped round in which request i (of ``req_ids``) had one new token, row i of the
        tensors; False (nothing kept) when some request's position does not follow its kept rows
        (the caller then takes :meth:`stash`)."""
        first = positions.tolist()
        for req_id, position in zip(req_ids, first):
            expected = self.next_position.get(req_id)
            if expected is not None and expected != position:
                return False
        self.records.append(DecodeRecord(tuple(req_ids), input_ids.clone(), positions.clone(), raw_hidden.clone(),
                                         slots.clone()))
        self.record_rows += len(req_ids)
        for req_id, position in zip(req_ids, first):
            self.next_position[req_id] = position + 1
        return True

    def materialize(self, combine: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move the batch records into the per-request rows, their hidden states combined by
        ``combine`` (the drafter's input layer) in one call."""
        if not self.records:
            return
        records, self.records, self.record_rows = self.records, [], 0
        input_ids = torch.cat([r.input_ids for r in records])
        positions = torch.cat([r.positions for r in records])
        hidden = combine(torch.cat([r.raw_hidden for r in records]))
        slots = torch.cat([r.slots for r in records])
        rows: dict[str, list[int]] = {}
        offset = 0
        for record in records:
            for index, req_id in enumerate(record.req_ids):
                rows.setdefault(req_id, []).append(offset + index)
            offset += len(record.req_ids)
        for req_id, indices in rows.items():
            if req_id not in self.next_position:  # finished since
                self.rows_dropped += len(indices)
                continue
            select = torch.tensor(indices, dtype=torch.long, device=input_ids.device)
            entry = self.pending.get(req_id)
            if entry is None:
                entry = self.pending[req_id] = SkippedRows([], [], [], [], int(positions[indices[0]]))
            entry.input_ids.append(input_ids.index_select(0, select))
            entry.positions.append(positions.index_select(0, select))
            entry.hidden.append(hidden.index_select(0, select))
            entry.slots.append(slots.index_select(0, select))
            entry.next_position = int(positions[indices[-1]]) + 1

    def stash(self, req_ids: Sequence[str], cad: Any, sample_indices: torch.Tensor, input_ids: torch.Tensor,
              positions: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the first-call rows of a skipped round: per request its rows up to and including its
        sampled row (rows after it are rejected drafts, rewritten later). Call :meth:`materialize`
        first when records are kept."""
        if self.records:
            raise RuntimeError("SkippedTokens.stash after stash_decode without materialize: rows would be out of order")
        starts = cad.query_start_loc_cpu.tolist()
        ends = (sample_indices.to("cpu") + 1).tolist()
        for row, req_id in enumerate(req_ids[: cad.batch_size()]):
            start, end = starts[row], ends[row]
            if end <= start:
                continue
            first = int(positions[start])
            entry = self.pending.get(req_id)
            if entry is not None and entry.next_position != first:  # positions restarted: stale
                self.rows_dropped += len(self.pending.pop(req_id))
                entry = None
            if entry is None:
                entry = self.pending[req_id] = SkippedRows([], [], [], [], first)
            entry.input_ids.append(input_ids[start:end].clone())
            entry.positions.append(positions[start:end].clone())
            entry.hidden.append(hidden[start:end].clone())
            entry.slots.append(cad.slot_mapping[start:end].clone())
            entry.next_position = self.next_position[req_id] = int(positions[end - 1]) + 1

    def splice(self, req_ids: Sequence[str], num_tokens: int, sample_indices: torch.Tensor, cad: Any,
               input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor
               ) -> tuple[int, torch.Tensor, Any]:
        """Put each request's kept rows in front of its rows of this round, in the drafter's input
        buffers (``input_ids``, ``positions``, ``hidden`` are those buffers); returns the new row
        count, sampled-row indices and attention metadata. Call :meth:`materialize` first."""
        if self.records:
            raise RuntimeError("SkippedTokens.splice with batch records kept: call materialize first")
        batch_size = cad.batch_size()
        starts = cad.query_start_loc_cpu.tolist()
        entries: list[SkippedRows | None] = []
        for row, req_id in enumerate(req_ids[:batch_size]):
            entry = self.pending.pop(req_id, None)
            self.next_position.pop(req_id, None)
            if entry is not None and (starts[row + 1] <= starts[row]
                                      or entry.next_position != int(positions[starts[row]])):
                self.rows_dropped += len(entry)
                entry = None
            entries.append(entry)
        extra = [len(entry) if entry is not None else 0 for entry in entries]
        added = sum(extra)
        if added == 0:
            return num_tokens, sample_indices, cad
        if num_tokens + added > self.capacity:
            logger.warning("drafter catch-up of %d rows does not fit its %d-row buffers; dropped", added,
                           self.capacity)
            self.rows_dropped += added
            return num_tokens, sample_indices, cad
        old = (input_ids[:num_tokens].clone(), positions[:num_tokens].clone(), hidden[:num_tokens].clone(),
               cad.slot_mapping[:num_tokens])
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for row, entry in enumerate(entries):
            if entry is not None:
                for part, kept in zip(parts, entry.cat()):
                    part.append(kept)
            for part, tensor in zip(parts, old):
                part.append(tensor[starts[row]:starts[row + 1]])
        for part, tensor in zip(parts, old):  # rows after the last request (padding), if any
            part.append(tensor[starts[batch_size]:num_tokens])
        total = num_tokens + added
        input_ids[:total] = torch.cat(parts[0])
        positions[:total] = torch.cat(parts[1])
        hidden[:total] = torch.cat(parts[2])
        slot_mapping = torch.cat(parts[3])

        shift = torch.tensor([0, *extra], dtype=torch.int64).cumsum(0)  # rows added before request i
        query_start_cpu = cad.query_start_loc_cpu + shift.to(cad.query_start_loc_cpu.dtype)
        query_lens = query_start_cpu[1:] - query_start_cpu[:-1]
        sample_indices = sample_indices + shift[1:].to(sample_indices.device, sample_indices.dtype)
        cad = cad.replace(
            query_start_loc=query_start_cpu.to(cad.query_start_loc.device, cad.query_start_loc.dtype),
            query_start_loc_cpu=query_start_cpu,
            num_actual_tokens=cad.num_actual_tokens + added,
            max_query_len=int(query_lens.max()),
            slot_mapping=slot_mapping,
            positions=None,
            _num_computed_tokens_cache=None,
            _token_to_req_indices_cache=None,
        )
        self.rows_caught_up += added
        return total, sample_indices, cad
