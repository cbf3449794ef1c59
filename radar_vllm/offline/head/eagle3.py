"""An EAGLE-3 draft head in plain PyTorch, computing what vLLM's ``llama_eagle3.py`` computes.

One draft step, for tokens at positions ``p``::

    h      = fc(aux)                      # step 0 only: [T, 3 * H_target] -> [T, H]
    e      = input_layernorm(embed(ids))  # ids are the tokens that follow the positions
    x      = cat(e, hidden_norm(h))       # [T, 2H]: q/k/v projections take 2H inputs
    r      = self_attn(x) + h             # the residual is the un-normed hidden
    r      = mlp(post_attention_layernorm(r)) + r
    out    = norm(r)                      # logits = lm_head(out) over the draft vocabulary
    next_h = r                            # pre-norm residual feeds the next draft step

Draft token ``i`` maps to target token ``i + d2t[i]``. Parameter names follow the checkpoint
layout vLLM loads (``midlayer.*``, ``fc``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), so
``state_dict()`` minus ``embed_tokens`` is a loadable checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HEAD_ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclasses.dataclass
class Eagle3HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} exceeds vocab_size={self.vocab_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.aux_layer_ids:
            raise ValueError("aux_layer_ids=[]; EAGLE-3 needs the target's aux layer ids")

    @classmethod
    def for_target(
        cls, target_config: dict[str, Any], aux_layer_ids: list[int], draft_vocab_size: int
    ) -> "Eagle3HeadConfig":
        """A head shaped like one layer of the target (same hidden size, heads and FFN)."""
        heads = int(target_config["num_attention_heads"])
        hidden = int(target_config["hidden_size"])
        rope_theta = target_config.get("rope_theta")
        if rope_theta is None:
            rope_theta = (target_config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(target_config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(target_config.get("num_key_value_heads", heads)),
            head_dim=int(target_config.get("head_dim") or hidden // heads),
            vocab_size=int(target_config["vocab_size"]),
            draft_vocab_size=int(draft_vocab_size),
            target_hidden_size=hidden,
            aux_layer_ids=list(aux_layer_ids),
            rms_norm_eps=float(target_config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(target_config.get("max_position_embeddings", 8192)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that vLLM 0.32 loads with ``"method": "eagle3"``."""
        return {
            "architectures": [HEAD_ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                "use_aux_hidden_state": True,
            },
        }

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "Eagle3HeadConfig":
        eagle = config.get("eagle_config") or {}
        layer_ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        if not layer_ids:
            raise ValueError("config.json lacks eagle_config.eagle_aux_hidden_state_layer_ids")
        heads = int(config["num_attention_heads"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            vocab_size=int(config["vocab_size"]),
            draft_vocab_size=int(config.get("draft_vocab_size") or config["vocab_size"]),
            target_hidden_size=int(config.get("target_hidden_size") or config["hidden_size"]),
            aux_layer_ids=[int(i) for i in layer_ids],
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as vLLM)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(dtype) * self.weight.to(dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., head_dim] for ``positions`` [...] (neox layout: halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., head_dim]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, T, head_dim] with cos/sin [batch, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotated * sin


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3HeadConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.scale = 1.0 / math.sqrt(config.head_dim)
        in_features = 2 * config.hidden_size
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, D] and k, v [B, kv_heads, T, D] (rotary applied) for x [B, T, 2H]."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def expand_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """[B, kv_heads, T, D] -> [B, heads, T, D] (grouped-query sharing)."""
        return kv.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, D] -> [B, T, H]."""
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention over ``kv_cache`` + the new tokens.

        x: [B, T, 2H]; positions: [B, T]; attention_mask: bool [B, T, S] or [T, S] (True =
        attend; S = cached + T) or None for causal attention over the new tokens after all the
        cached ones. Returns (output [B, T, H], (keys, values) [B, kv_heads, S, D]).
        """
        q, k, v = self.project(x, positions)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        new_len, total_len = q.shape[2], k.shape[2]
        if attention_mask is None:
            cached = total_len - new_len
            attention_mask = torch.ones(new_len, total_len, dtype=torch.bool, device=x.device).tril(cached)
        if attention_mask.dim() == 3:
            attention_mask = attention_mask.unsqueeze(1)  # [B, 1, T, S]
        attended = F.scaled_dot_product_attention(
            q, self.expand_kv(k), self.expand_kv(v), attn_mask=attention_mask, scale=self.scale
        )
        return self.output(attended), (k, v)


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The single draft layer (``midlayer``)."""

    def __init__(self, config: Eagle3HeadConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def attention_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """cat(input_layernorm(embeds), hidden_norm(hidden)): [B, T, 2H]."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, attn_out: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Residual + MLP after attention; returns the pre-norm residual [B, T, H]."""
        residual = attn_out + hidden
        return self.mlp(self.post_attention_layernorm(residual)) + residual


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head. ``embed_tokens`` is the target's (frozen, not exported)."""

    def __init__(self, config: Eagle3HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(len(config.aux_layer_ids) * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # d2t[i]: offset so that draft id i maps to target id i + d2t[i]; t2d: target id in draft vocab.
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))  # [draft_vocab]
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))  # [vocab]

    def set_draft_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Set d2t/t2d from the target ids of the draft vocabulary (sorted ascending)."""
        if draft_to_target.shape != (self.config.draft_vocab_size,):
            raise ValueError(
                f"draft_to_target has shape {tuple(draft_to_target.shape)}; expected "
                f"({self.config.draft_vocab_size},)"
            )
        ids = draft_to_target.to(torch.long)
        if not torch.all(ids[1:] > ids[:-1]):
            raise ValueError("draft_to_target must be strictly increasing target ids")
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft-vocabulary ids."""
        return draft_ids + self.d2t[draft_ids]

    def target_to_draft_ids(self) -> torch.Tensor:
        """[vocab] draft id of each target id, NOT_IN_DRAFT_VOCAB (-1) where absent."""
        mapping = torch.full((self.config.vocab_size,), NOT_IN_DRAFT_VOCAB, dtype=torch.long, device=self.d2t.device)
        draft_ids = torch.arange(self.config.draft_vocab_size, device=self.d2t.device)
        mapping[self.draft_to_target_ids(draft_ids)] = draft_ids
        return mapping

    def combine_hidden_states(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """fc over the concatenated aux hidden states: [..., n_aux * H_target] -> [..., H]."""
        return self.fc(aux_hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One draft step.

        hidden_states: [B, T, H] (fc output at step 0, the previous pre-norm residual after);
        positions: [B, T]; input_ids: [B, T] or inputs_embeds: [B, T, H]; attention_mask /
        kv_cache as in :meth:`Eagle3Attention.forward`.
        Returns (normed [B, T, H] for :meth:`compute_logits`, pre-norm residual [B, T, H],
        (keys, values) including the new tokens).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        layer = self.midlayer
        attn_out, cache = layer.self_attn(
            layer.attention_input(inputs_embeds, hidden_states), positions, attention_mask, kv_cache
        )
        prenorm = layer.finish(attn_out, hidden_states)
        return self.norm(prenorm), prenorm, cache

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., draft_vocab]."""
        return self.lm_head(normed)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors of a vLLM EAGLE-3 checkpoint (no embed_tokens: vLLM shares the target's)."""
        return {
            name: tensor.detach().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith("embed_tokens")
        }


NOT_IN_DRAFT_VOCAB = -1
