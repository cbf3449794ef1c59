"""Target and draft-head runners of the reference decoder (plain PyTorch, batch size 1).

Sequence bookkeeping (positions are token indices in the request). With committed tokens
``x_0 .. x_{m-1}``:

- the target's KV cache holds ``x_0 .. x_{m-2}``; ``x_{m-1}`` (the last emitted token) is the
  *root* of the next tree and is fed to the target by the next verify pass;
- the head's KV cache holds its entries for positions ``0 .. m-2``: at position p the head reads
  ``fc(aux_p)`` (the target's hidden states at the aux layers for x_p) and the embedding of
  ``x_{p+1}``, and predicts ``x_{p+2}``. Its first call of a round therefore covers the newly
  committed positions and ends at position m-2 with token x_{m-1}, whose output is the root
  distribution (depth-1 candidates, position m). A frontier node at depth d is read at head
  position ``m - 2 + d`` with its parent's pre-norm output as hidden state.

Tree attention is an explicit mask: for the target, a 4-D additive mask over cache + (root,
nodes); for the head, a boolean mask over its cache + the frontier.

Worked example: prompt of 5 tokens, first token emitted by prefill -> m = 6; the target cache
holds positions 0..4, the root x_5 sits at position 5 and a depth-2 node at position 7.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from radar_vllm.offline.head.eagle3 import Eagle3Head, Eagle3HeadConfig
from radar_vllm.core.costs import files_sha256
from radar_vllm.core.tree import DraftTree

logger = logging.getLogger(__name__)

def directory_identity(path: str | Path) -> tuple[str, str]:
    """(id, sha256) of a model folder: id = ``<folder name>@<first 12 hex digits>``.

    The hash covers ``config.json`` and every ``*.safetensors`` file (sorted by name), so two
    copies of the same weights share an id and retrained weights do not.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    files = [path / "config.json"] + sorted(path.glob("*.safetensors"))
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"model file not found: {file}")
    full = files_sha256(files)
    return f"{path.resolve().name}@{full[:12]}", full


def load_target(path: str | Path, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Any:
    """An HF causal LM in eval mode (eager attention: it takes our additive 4-D masks as is)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def load_head(path: str | Path, target: Any, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Eagle3Head:
    """An EAGLE-3 head from an exported folder, sharing the target's token embedding.

    ``t2d`` is derived from ``d2t`` when the checkpoint leaves it out (vLLM does not need it).
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"head config not found: {config_path}")
    config = Eagle3HeadConfig.from_hf_config(json.loads(config_path.read_text(encoding="utf-8")))
    target_hidden = int(target.config.hidden_size)
    if config.target_hidden_size != target_hidden:
        raise ValueError(f"head {path} expects target_hidden_size={config.target_hidden_size}, "
                         f"but the target has hidden_size={target_hidden}")
    if config.vocab_size != int(target.config.vocab_size):
        raise ValueError(f"head {path} has vocab_size={config.vocab_size}, the target "
                         f"{int(target.config.vocab_size)}")
    num_layers = int(target.config.num_hidden_layers)
    for layer in config.aux_layer_ids:
        if not 0 <= layer < num_layers:
            raise ValueError(f"head {path} reads aux layer {layer}; the target has {num_layers}")
    head = Eagle3Head(config)
    tensors: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in head directory {path}")
    state = {name: (t if name in ("d2t", "t2d") else t.float()) for name, t in tensors.items()}
    if "t2d" not in state and "d2t" in state:
        d2t = state["d2t"].long()
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(d2t.numel()) + d2t] = True
        state["t2d"] = t2d
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("embed_tokens")]
    if missing or unexpected:
        raise ValueError(f"head {path}: missing tensors {missing}, unexpected {unexpected}")
    with torch.no_grad():
        head.embed_tokens.weight.copy_(target.get_input_embeddings().weight.float())
    return head.to(device=device, dtype=dtype).eval()


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean attend-mask -> additive float mask (0 where attended, dtype min elsewhere)."""
    zeros = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zeros, torch.finfo(dtype).min)


class TargetRunner:
    """The target with a KV cache, tree verify passes and compaction of the accepted path."""

    def __init__(self, model: Any, aux_layer_ids: Sequence[int]) -> None:
        from transformers import DynamicCache

        self.model = model
        self.aux_layer_ids = list(aux_layer_ids)
        self._cache_class = DynamicCache
        self.cache: Any = None
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def _forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
        """logits [T, V] float32 and aux hidden states [T, A * H] of new tokens [T]."""
        outputs = self.model(
            input_ids=input_ids[None].to(self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=None if mask is None else _additive(mask, self.dtype)[None, None],
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.cache = outputs.past_key_values
        aux = torch.cat([outputs.hidden_states[layer][0] for layer in self.aux_layer_ids], -1)
        return outputs.logits[0].float(), aux

    @torch.no_grad()
    def prefill(self, prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Start a request: logits ``[T, V]`` and aux ``[T, A*H]`` of the prompt ``[T]``."""
        self.cache = self._cache_class()
        length = prompt_ids.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        return self._forward(prompt_ids, torch.arange(length), causal)

    @torch.no_grad()
    def decode(self, token: int) -> tuple[Tensor, Tensor]:
        """One plain step: logits ``[1, V]``, aux ``[1, A*H]`` of ``token`` appended at the end."""
        position = self.cache_length
        return self._forward(torch.tensor([token]), torch.tensor([position]), None)

    @torch.no_grad()
    def verify(self, root_token: int, tree: DraftTree) -> tuple[Tensor, Tensor]:
        """Run the root and the tree's nodes (batch row 0): logits/aux ``[1 + n, ...]``.

        Row 0 is the prediction after the root, row 1 + i after node i (verify.py's rows).
        """
        context = self.cache_length
        num_nodes = int(tree.num_nodes[0])
        tokens = torch.cat([torch.tensor([root_token]), tree.target_tokens[0, :num_nodes].cpu()])
        positions = context + torch.cat([torch.zeros(1, dtype=torch.long),
                                         tree.depths[0, :num_nodes].cpu()])
        size = 1 + num_nodes
        mask = torch.zeros(size, context + size, dtype=torch.bool)  # [1 + n, context + 1 + n]
        mask[:, : context + 1] = True  # context and root
        mask[1:, context + 1:] = tree.ancestor_mask()[0, :num_nodes, :num_nodes].cpu()
        return self._forward(tokens, positions, mask)

    def keep(self, num_context: int, kept_rows: Sequence[int]) -> None:
        """Compact the cache to its first ``num_context`` entries + the given entries after them.

        ``kept_rows`` index the rows of the last verify pass (0 = root).
        """
        index = torch.cat([torch.arange(num_context),
                           num_context + torch.tensor(list(kept_rows), dtype=torch.long)])
        index = index.to(self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


class HeadRunner:
    """The EAGLE-3 head with its own KV cache: committed entries, then the current tree's."""

    def __init__(self, head: Eagle3Head) -> None:
        self.head = head
        self.dtype = head.fc.weight.dtype
        self.device = head.fc.weight.device
        self.cache: tuple[Tensor, Tensor] | None = None
        self.num_committed = 0

    def reset(self) -> None:
        self.cache = None
        self.num_committed = 0

    def _truncate(self, length: int) -> None:
        if self.cache is not None:
            self.cache = (self.cache[0][:, :, :length], self.cache[1][:, :, :length])

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else int(self.cache[0].shape[2])

    def discard_tree(self) -> None:
        """Drop the tree entries of the current round (keep the committed ones)."""
        self._truncate(self.num_committed)

    @torch.no_grad()
    def first_call(self, aux: Tensor, next_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Newly committed positions: aux ``[T, A*H]``, following tokens ``[T]``.

        Drops the previous round's tree entries, appends T committed entries and returns the
        root's draft log-probs ``[V_draft]`` and pre-norm hidden ``[H]`` (last row).
        """
        self._truncate(self.num_committed)
        start, length = self.num_committed, aux.shape[0]
        hidden = self.head.combine_hidden_states(aux.to(self.device, self.dtype))[None]
        positions = torch.arange(start, start + length, device=self.device)[None]
        mask = torch.ones(length, start + length, dtype=torch.bool, device=self.device).tril(start)
        normed, prenorm, self.cache = self.head(
            hidden, positions, input_ids=next_tokens.to(self.device)[None],
            attention_mask=mask[None], kv_cache=self.cache)
        self.num_committed = start + length
        logits = self.head.compute_logits(normed[0, -1]).float()
        return torch.log_softmax(logits, -1), prenorm[0, -1]

    @torch.no_grad()
    def tree_call(self, tokens: Tensor, hidden: Tensor, depths: Tensor, visible: Tensor
                  ) -> tuple[Tensor, Tensor]:
        """One tree level: frontier tokens ``[K]`` (target ids), parent hidden ``[K, H]``, depths
        ``[K]``, ``visible [K, E]`` bool over the tree entries already in the cache.

        Returns draft log-probs ``[K, V_draft]`` and pre-norm hidden ``[K, H]``; the K new
        entries are appended to the cache.
        """
        committed, width = self.num_committed, tokens.shape[0]
        tree_entries = self.cache_length - committed
        if visible.shape != (width, tree_entries):
            raise ValueError(f"visible must have shape ({width}, {tree_entries}), "
                             f"got {tuple(visible.shape)}")
        positions = (committed - 1 + depths).to(self.device)[None]
        mask = torch.cat([
            torch.ones(width, committed, dtype=torch.bool),
            visible.cpu(),
            torch.eye(width, dtype=torch.bool),
        ], dim=1).to(self.device)
        normed, prenorm, self.cache = self.head(
            hidden.to(self.device, self.dtype)[None], positions,
            input_ids=tokens.to(self.device)[None], attention_mask=mask[None],
            kv_cache=self.cache)
        logits = self.head.compute_logits(normed[0]).float()
        return torch.log_softmax(logits, -1), prenorm[0]
