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

A round the gate skips that carries a prefill chunk writes the chunk's drafter KV (prompt blocks
are shared through the prefix cache). A row's K/V depend on that row alone, so such a round runs
only the drafter's input norms and K/V projections (:class:`DrafterKVWriter`), not its attention,
MLP or logits: on a 2-core CPU this took a catch-up over a 16-request batch's 1,121 prompt rows
from 180 to 78 ms. The other requests' kept rows stay kept: their row of that round goes into the
kept rows after them (its K/V are written now and again when they catch up), so a busy server does
not push every kept row of the batch through the drafter at each arrival, only when a round
drafts again.

The rows are small (one hidden vector per token). They are dropped when the request is gone (rows
in batch records when room is needed or when they are combined: on a busy server that holds depth
0 most kept rows belong to requests that have finished, and a catch-up forced by rows that would
be dropped anyway cost 90-120 ms a time), and when a request's positions restart (preemption
recomputes it from its prompt), where they would no longer be contiguous with the new rows. A
catch-up that would not fit the drafter's input buffers is dropped too (the drafter then reads
stale KV there: fewer accepted drafts, same outputs, since verification does not trust the
drafter).
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
        self._finished_in_records = False  # some request in ``records`` has finished (see forget)

    def __bool__(self) -> bool:
        return bool(self.pending) or bool(self.records)

    def rows(self) -> int:
        """Rows kept in all."""
        return sum(len(entry) for entry in self.pending.values()) + self.record_rows

    def has_room(self, more: int) -> bool:
        """Whether ``more`` rows can join the kept ones while they fill at most half the drafter's
        buffers (the other half is the catch-up round's own rows). Rows of finished requests still
        in batch records are dropped first when they would make the answer no (on a busy server
        most kept rows may be theirs: a forced catch-up would combine them only to drop them)."""
        if self.rows() + more > self.capacity // 2 and self._finished_in_records:
            self._prune_records()
        return self.rows() + more <= self.capacity // 2

    def forget(self, live_req_ids: Any) -> None:
        """Drop the rows of requests that are no longer running (in records: when room is needed or
        they are combined)."""
        for req_id in [r for r in self.next_position if r not in live_req_ids]:
            del self.next_position[req_id]
            if req_id in self.pending:
                self.rows_dropped += len(self.pending.pop(req_id))
            if self.records:
                self._finished_in_records = True

    def _prune_records(self) -> None:
        """Remove the rows of finished requests (no longer in ``next_position``) from the batch records."""
        kept: list[DecodeRecord] = []
        for record in self.records:
            rows = [i for i, req_id in enumerate(record.req_ids) if req_id in self.next_position]
            if len(rows) < len(record.req_ids):
                self.rows_dropped += len(record.req_ids) - len(rows)
                if not rows:
                    continue
                select = torch.tensor(rows, dtype=torch.long, device=record.input_ids.device)
                record = DecodeRecord(tuple(record.req_ids[i] for i in rows), record.input_ids.index_select(0, select),
                                      record.positions.index_select(0, select),
                                      record.raw_hidden.index_select(0, select), record.slots.index_select(0, select))
            kept.append(record)
        self.records = kept
        self.record_rows = sum(len(record.req_ids) for record in kept)
        self._finished_in_records = False

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
        if self._finished_in_records:
            self._prune_records()  # (not combined only to be dropped)
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
        for req_id, indices in rows.items():  # (rows of finished requests were pruned above)
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


class DrafterKVWriter:
    """Call 1 of a round that drafts nothing (``CATCH_UP_ROUND``), reduced to what it leaves behind:
    the drafter's K/V at its rows. EAGLE-3's single layer reads each row's K/V from that row alone
    (its token's embedding and its combined hidden state, normed, concatenated, projected, K
    rotated), so the attention over the context, the output projection, the MLP and the final norm
    a full call 1 also runs over every row are skipped; on a 2-core CPU a catch-up over 1,100
    prompt rows took 180 ms as a full call. It calls the drafter's own modules (vLLM's
    ``LlamaAttention.forward`` up to the attention, and the Eagle-3 decoder layer's norms) and the
    attention backend's own cache write; the forward it stands for is compiled, these run eagerly,
    so the K/V can differ from the full call's in the last bits (drafts read them through the
    attention's softmax; the tests hold call-1 logits after a catch-up within 1e-3 of an
    always-drafting run's and its drafts equal).

    ``None`` from :meth:`build` where the drafter is not of that shape (more layers, no
    ``hidden_norm``, an attention backend without ``do_kv_cache_update``): catch-ups then run the
    full call 1 as vLLM does."""

    def __init__(self, model: Any, layer: Any) -> None:
        self.model = model
        self.layer = layer
        self.attention = layer.self_attn

    @classmethod
    def build(cls, model: Any) -> "DrafterKVWriter | None":
        inner = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", ()) or ())
        if len(layers) != 1 or not hasattr(inner, "embed_input_ids"):
            return None
        layer = layers[0]
        attention = getattr(layer, "self_attn", None)
        needed = (getattr(layer, "layer_idx", None) == 0, hasattr(layer, "hidden_norm"),
                  hasattr(layer, "_residual_norm"), hasattr(layer, "input_layernorm"),
                  attention is not None and all(hasattr(attention, name) for name in
                                                ("qkv_proj", "rotary_emb", "attn", "q_size", "kv_size")))
        if not all(needed) or not hasattr(attention.attn.impl, "do_kv_cache_update"):
            return None
        return cls(model, layer)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """Write the drafter's K/V of rows (``input_ids``, ``positions``, combined ``hidden``) at ``slots``."""
        embeds = self.layer.input_layernorm(self.model.model.embed_input_ids(input_ids))
        normed, _ = self.layer._residual_norm(hidden_states=hidden)
        qkv, _ = self.attention.qkv_proj(torch.cat([embeds, normed], dim=-1))
        query, key, value = qkv.split([self.attention.q_size, self.attention.kv_size, self.attention.kv_size], dim=-1)
        _, key = self.attention.rotary_emb(positions, query, key)
        attn = self.attention.attn
        shape = (-1, attn.num_kv_heads, attn.head_size)
        attn.impl.do_kv_cache_update(attn, key.reshape(shape).contiguous(), value.reshape(shape).contiguous(),
                                     attn.kv_cache, slots)
