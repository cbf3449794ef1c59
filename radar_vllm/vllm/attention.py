"""Tree-aware attention for the target's verify pass on the CPU platform.

:class:`RadarTreeCPUAttentionImpl` is vLLM's ``CPUAttentionBackendImpl`` with one addition: while
a :class:`TreeVerifyPlan` is active (the tree runner switches it on only around the *target*
forward of a step that verifies trees), each layer, after the platform kernel has attended the
whole batch causally, recomputes the rows of tree nodes whose ancestors are not the contiguous
rows before them. Everything else (prefill, chunked prefill, plain decode, chain drafts, the draft
model, warm-up) is the platform's own code path, untouched.

Exactness. A torch re-implementation of attention differs from the C++ kernel by an ULP on some
rows and flips greedy near-ties. So tree rows are computed by the same kernel: for node ``i``
with root-to-node path ``p_1 .. p_d`` the layer writes the path's K/V (rows of this step's
``key``/``value``) into the slots of segment rows ``1 .. d`` (right after the root), runs the
kernel for that single query row as a one-token request with ``seq_len = context + 1 + d``, and
after the last round rewrites every tree node's own K/V into its own slot. The query sees
exactly what it would see when decoding the path token by token. See
:mod:`radar_vllm.vllm.tree_verify` for the plan's construction and a worked example.

With scratch blocks (:mod:`radar_vllm.vllm.scratch`, opt-in with ``RADAR_TREE_SCRATCH_BLOCKS``) the
rows do not take turns in the request's own slots: each row gets private copies of the blocks where
its path goes (the first one copied whole from the request's block, so it holds the context's last
tokens and the root in the cache's own layout), its path K/V are written there, and its block table
points at them. All rows of the step then share one kernel call per layer (more only when the
pool runs out), and the request's own slots are never overwritten. The kernel sees the same K/V at
the same positions either way, so the rows are the same bits.

Per layer the plan also stashes the tree rows' K/V and slot mapping, so the runner can compact
the accepted path after acceptance with the platform's own ``reshape_and_cache`` (layout-agnostic:
the key layout inside a CPU cache block depends on the ISA).

Installation: the tree runner swaps the impl class of each CPU attention layer after loading the
model (:func:`install_tree_attention`); the class only adds a branch that is inert without a plan.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from radar_vllm.vllm.tree_verify import PathRound, ScratchRound

logger = logging.getLogger(__name__)


@dataclass
class LayerStash:
    """A layer's tree-row K/V of this step, for compaction after acceptance."""

    # [num_stashed, num_kv_heads, head_size]
    key: Tensor
    value: Tensor
    # [num_tokens] slot of every row of the step
    slot_mapping: Tensor
    kv_cache: Tensor
    layer: Any
    impl: Any


@dataclass
class TreeVerifyPlan:
    # PathRounds (rows recomputed in the request's own slots, restored afterwards) or ScratchRounds
    # (rows recomputed over scratch blocks, see radar_vllm.vllm.scratch); never mixed
    rounds: list[PathRound] | list[ScratchRound]
    # [num_stashed] int64: rows of all tree nodes of the step (restored after path rounds, stashed)
    node_rows: Tensor
    stash: dict[str, LayerStash] = field(default_factory=dict)
    _scheduler_metadata: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)
    # round index -> (block table [J, max_blocks] int32, copy source blocks [P] int64), the same in every layer
    _scratch_tables: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def uses_scratch(self) -> bool:
        return bool(self.rounds) and isinstance(self.rounds[0], ScratchRound)


def scratch_tables(plan: TreeVerifyPlan, index: int, step: ScratchRound, block_table: Tensor) -> tuple[Tensor, Tensor]:
    """Round ``index``'s per-row block table (the request's, with scratch columns swapped in) and
    the physical blocks its copies read; computed once per step (all layers share the table)."""
    cached = plan._scratch_tables.get(index)
    if cached is None:
        table = block_table[step.request_indices].clone()
        table[step.table_jobs, step.table_columns] = step.table_blocks.to(table.dtype)
        sources = block_table[step.copy_requests, step.copy_columns].to(torch.long)
        cached = (table.contiguous(), sources)
        plan._scratch_tables[index] = cached
    return cached


@dataclass
class FrontierRound:
    """One kernel call of a frontier draft pass: frontier slot ``f`` of every request."""

    # [B] int64: rows of the pass recomputed (one per request)
    query_rows: Tensor
    # [B, max_blocks] int32: each row's block table (its request's)
    block_table: Tensor
    # [B] int32: context + root + path length of each row
    seq_lens: Tensor
    # [W] int64: pass index (into the layer's history; the last one is the current pass) and row
    # of every path entry to write, and its destination slot (-1: skipped)
    source_pass: Tensor
    source_rows: Tensor
    destination_slots: Tensor


@dataclass
class DraftFrontierPlan:
    """A frontier draft pass of the EAGLE-3 layer (see :mod:`radar_vllm.vllm.tree_drafter`).

    Every row attends to the draft layer's cached context and its own path of frontier nodes,
    whose K/V come from this plan's per-layer history of earlier passes (a private dense buffer
    for the round: the frontier has no KV slots reserved by vLLM) plus the current pass.
    """

    rounds: list[FrontierRound]
    # layer name -> [(key [R, kv_heads, head], value)] of earlier frontier passes of the round
    history: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    _scheduler_metadata: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)


# the plans applied by every tree-aware attention layer right now: "verify" (TreeVerifyPlan) and
# "draft" (DraftFrontierPlan), each None outside its block
_active: dict[str, Any] = {"verify": None, "draft": None}


@contextlib.contextmanager
def _activated(kind: str, plan: Any) -> Iterator[None]:
    previous = _active[kind]
    _active[kind] = plan
    try:
        yield
    finally:
        _active[kind] = previous


def active_draft_plan(plan: DraftFrontierPlan | None) -> contextlib.AbstractContextManager[None]:
    """Run every tree-aware attention layer inside the block as a frontier draft pass."""
    return _activated("draft", plan)


def active_plan(plan: TreeVerifyPlan | None) -> contextlib.AbstractContextManager[None]:
    """Apply ``plan`` to every tree-aware attention layer run inside the block."""
    return _activated("verify", plan)


def _split_cache(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """CPU cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` -> key, value views."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
    view = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1))
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


def write_kv(layer: Any, impl: Any, kv_cache: Tensor, key: Tensor, value: Tensor, slots: Tensor) -> None:
    """Write ``key``/``value`` ``[n, num_kv_heads, head_size]`` into ``slots`` with the platform op."""
    from vllm import _custom_ops as ops

    key_cache, value_cache = _split_cache(kv_cache)
    ops.cpu_attn_reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        layer.isa,
        k_scale=layer._k_scale_float,
        v_scale=layer._v_scale_float,
        kv_cache_dtype=impl.kv_cache_dtype,
    )


def _make_impl_class() -> type:
    import vllm.envs as envs
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    class RadarTreeCPUAttentionImpl(CPUAttentionBackendImpl):
        """CPU attention that also applies the active :class:`TreeVerifyPlan` (see module doc)."""

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
            draft_plan = _active["draft"]
            if draft_plan is not None and attn_metadata is not None and self.attn_type == AttentionType.DECODER:
                self._apply_draft_plan(draft_plan, layer, query, key, value, kv_cache, output)
                return output
            result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            plan = _active["verify"]
            if plan is None or attn_metadata is None or self.attn_type != AttentionType.DECODER:
                return result
            self._apply_plan(plan, layer, query, key, value, kv_cache, attn_metadata, output)
            return result

        def _run_rows(self, plan: Any, index: int, layer: Any, query: Tensor, kv_cache: Tensor, rows: Tensor,
                      seq_lens: Tensor, block_table: Tensor) -> Tensor:
            """The platform kernel for ``rows`` of ``query``, each a one-token request."""
            key_cache, value_cache = _split_cache(kv_cache)
            num_rows = int(rows.numel())
            query_start = torch.arange(num_rows + 1, dtype=torch.int32)
            cache_key = (index, self.num_heads, self.num_kv_heads, self.head_size, query.dtype, layer.isa,
                         self.sliding_window)
            metadata = plan._scheduler_metadata.get(cache_key)
            if metadata is None:
                metadata = ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=num_rows, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype, query_start_loc=query_start,
                    causal=True, sliding_window_size=self.sliding_window, isa=layer.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype,
                )
                plan._scheduler_metadata[cache_key] = metadata
            rows_query = query[rows].contiguous()
            rows_output = torch.empty_like(rows_query)
            ops.cpu_attention_with_kv_cache(
                query=rows_query, key_cache=key_cache, value_cache=value_cache, output=rows_output,
                query_start_loc=query_start, seq_lens=seq_lens, scale=self.scale, causal=True,
                alibi_slopes=self.alibi_slopes, sliding_window=self.sliding_window,
                block_table=block_table.contiguous(), softcap=self.logits_soft_cap, scheduler_metadata=metadata,
                s_aux=self.sinks, dynamic_causal=None, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            return rows_output

        def _apply_draft_plan(self, plan: DraftFrontierPlan, layer, query, key, value, kv_cache, output) -> None:
            num_rows = plan.rounds[0].query_rows.numel() * len(plan.rounds)
            history = plan.history.setdefault(layer.layer_name, [])
            current = (key[:num_rows].contiguous(), value[:num_rows].contiguous())
            keys = torch.stack([k for k, _ in history] + [current[0]])  # [passes, R, kv_heads, head]
            values = torch.stack([v for _, v in history] + [current[1]])
            view = output.view(output.shape[0], self.num_heads, self.head_size) if output.dim() == 2 else output
            for index, step in enumerate(plan.rounds):
                write_kv(layer, self, kv_cache, keys[step.source_pass, step.source_rows],
                         values[step.source_pass, step.source_rows], step.destination_slots)
                rows_output = self._run_rows(plan, index, layer, query, kv_cache, step.query_rows, step.seq_lens,
                                             step.block_table)
                view[step.query_rows] = rows_output.view(-1, self.num_heads, self.head_size)
            history.append(current)

        def _apply_plan(self, plan, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
            slot_mapping = attn_metadata.slot_mapping
            for index, step in enumerate(plan.rounds):
                if isinstance(step, ScratchRound):
                    block_table, copy_sources = scratch_tables(plan, index, step, attn_metadata.block_table)
                    if copy_sources.numel():
                        kv_cache.index_copy_(0, step.copy_blocks, kv_cache.index_select(0, copy_sources))
                    write_kv(layer, self, kv_cache, key[step.source_rows], value[step.source_rows],
                             step.destination_slots)
                else:
                    block_table = attn_metadata.block_table[step.request_indices].contiguous()
                    write_kv(layer, self, kv_cache, key[step.source_rows], value[step.source_rows],
                             slot_mapping[step.destination_rows])
                rows_output = self._run_rows(plan, index, layer, query, kv_cache, step.query_rows, step.seq_lens,
                                             block_table)
                output[step.query_rows] = rows_output.view(-1, *output.shape[1:])
            rows = plan.node_rows
            if rows.numel() == 0:
                return
            node_key, node_value = key[rows].contiguous(), value[rows].contiguous()
            if plan.rounds and not plan.uses_scratch:  # path rounds overwrote the nodes' own slots
                write_kv(layer, self, kv_cache, node_key, node_value, slot_mapping[rows])
            plan.stash[layer.layer_name] = LayerStash(
                key=node_key, value=node_value, slot_mapping=slot_mapping.clone(), kv_cache=kv_cache,
                layer=layer, impl=self,
            )

    return RadarTreeCPUAttentionImpl


_impl_class: type | None = None


def tree_impl_class() -> type:
    global _impl_class
    if _impl_class is None:
        _impl_class = _make_impl_class()
    return _impl_class


def install_tree_attention(layers: Sequence[Any]) -> int:
    """Swap the impl of every CPU attention layer in ``layers`` to the tree-aware one; returns the count."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    cls = tree_impl_class()
    count = 0
    for layer in layers:
        impl = getattr(layer, "impl", None)
        if type(impl) is CPUAttentionBackendImpl:
            impl.__class__ = cls
            count += 1
        elif impl is not None and not isinstance(impl, cls):
            raise ValueError(
                f"RADAR tree verification on CPU needs vLLM's CPU attention backend, layer "
                f"{getattr(layer, 'layer_name', '?')} uses {type(impl).__name__}"
            )
    return count


def compact(plan: TreeVerifyPlan, source_index: Tensor, destination_rows: Tensor) -> None:
    """Rewrite stashed node K/V ``source_index`` (into ``plan.node_rows``) at the slots of
    ``destination_rows`` in every stashed layer."""
    if source_index.numel() == 0:
        return
    for stash in plan.stash.values():
        write_kv(stash.layer, stash.impl, stash.kv_cache, stash.key[source_index], stash.value[source_index],
                 stash.slot_mapping[destination_rows])


__all__ = ["DraftFrontierPlan", "FrontierRound", "LayerStash", "TreeVerifyPlan", "active_draft_plan", "active_plan", "compact", "install_tree_attention", "tree_impl_class",
           "write_kv"]
