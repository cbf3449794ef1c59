"""Tiny deterministic models for tests: a Llama target, a matching EAGLE-3 head, a random policy.

Everything is built from a seed in well under a second and written as ordinary HF folders that
stock vLLM loads (float32 weights, safetensors, a real byte-level BPE tokenizer with a ChatML
chat template). Nothing here imports vLLM.

The target is built so that speculative decoding has something to accept: its greedy next token
is *mostly* a fixed permutation ``successor`` of the current token (the lm_head rows are aligned
with the embedding of each token's predecessor), perturbed by random attention and MLP layers
scaled by ``context_scale`` so that the context still changes some of the choices. Generated
tokens therefore stay inside a subset ``S`` of the vocabulary (the head's draft vocabulary).
The matching EAGLE-3 head reads the target's hidden state at the first aux layer (about the
embedding of the previous token ``t``) through ``fc`` and predicts ``successor(successor(t))``,
which is the right depth-1 draft whenever the target followed the permutation twice. Deeper
drafts are mostly wrong, so acceptance lengths vary between 1 and 2 or so; exactness tests do not
depend on it, they only benefit from accepted tokens being exercised.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A few hundred words of plain text; the BPE merges are learned from it.
_TOKENIZER_CORPUS = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "Speculative decoding drafts a few tokens with a small model and verifies them with the "
    "large one in a single forward pass. A draft tree grows one level per draft call and a "
    "learned policy decides when to stop drafting and verify. Write a short poem about the sea. "
    "Explain how a binary search works, step by step, with an example in Python. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "What are the benefits of regular exercise? Exercise improves the heart, the lungs and the "
    "mood; it helps sleep and keeps the weight under control. "
    "Translate into German: good morning, how are you today? Guten Morgen, wie geht es dir? "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42. "
    "Once upon a time there was a small robot who wanted to learn how to paint the sky. "
    "Summarize the following article in three sentences. List five fruits: apple, banana, "
    "cherry, mango, orange. Who wrote Hamlet? William Shakespeare wrote Hamlet around 1600. "
)

# Metadata file written next to the tiny target: what the head factory needs to match it.
TINY_TARGET_RECORD = "radar_tiny_target.json"


def make_tiny_tokenizer(directory: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer (``vocab_size`` ids incl. 3 specials) into ``directory``.

    Byte-level means every string can be encoded. Writes ``tokenizer.json`` and
    ``tokenizer_config.json`` (with a ChatML chat template and ``<|im_end|>`` as EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": None,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(token)): {
                "content": token,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for token in SPECIAL_TOKENS
        },
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory


def _normal(generator: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * std


def make_tiny_llama(
    directory: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    tokenizer_vocab_size: int = 512,
    successor_vocab_size: int = 192,
    context_scale: float = 0.35,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama target (HF folder, float32) with a real tokenizer into ``directory``.

    ``hidden_size / num_heads`` must be a head size the CPU attention supports (32, 64, ...).
    ``successor_vocab_size`` is the size of the token subset S that generations stay in;
    ``context_scale`` scales the random layers (0: the output depends only on the last token).
    """
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    directory = Path(directory)
    make_tiny_tokenizer(directory, vocab_size=tokenizer_vocab_size)
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    vocab_size = len(tokenizer_json["model"]["vocab"])
    special_ids = sorted(tokenizer_json["model"]["vocab"][token] for token in SPECIAL_TOKENS)
    ordinary_ids = [i for i in range(vocab_size) if i not in set(special_ids)]
    if successor_vocab_size > len(ordinary_ids):
        raise ValueError(
            f"successor_vocab_size={successor_vocab_size} exceeds the {len(ordinary_ids)} ordinary tokens"
        )

    generator = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads
    embed = _normal(generator, vocab_size, hidden_size, std=1.0)  # [vocab, hidden]
    # S: the tokens generations stay in; successor: a random cyclic permutation of S.
    chosen = torch.randperm(len(ordinary_ids), generator=generator)[:successor_vocab_size]
    subset = torch.tensor(ordinary_ids)[chosen]  # [S]
    order = torch.randperm(successor_vocab_size, generator=generator)
    successor = {int(subset[order[i]]): int(subset[order[(i + 1) % successor_vocab_size]])
                 for i in range(successor_vocab_size)}
    lm_head = torch.zeros(vocab_size, hidden_size)  # rows outside S stay zero: never chosen
    for token, nxt in successor.items():
        lm_head[nxt] = embed[token]

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": torch.ones(hidden_size),
        "lm_head.weight": lm_head,
    }
    layer_std = 1.0 / hidden_size**0.5
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden_size)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden_size)
        tensors[prefix + "self_attn.q_proj.weight"] = _normal(
            generator, num_heads * head_dim, hidden_size, std=4.0 * layer_std)
        tensors[prefix + "self_attn.k_proj.weight"] = _normal(
            generator, num_kv_heads * head_dim, hidden_size, std=4.0 * layer_std)
        tensors[prefix + "self_attn.v_proj.weight"] = _normal(
            generator, num_kv_heads * head_dim, hidden_size, std=layer_std)
        tensors[prefix + "self_attn.o_proj.weight"] = _normal(
            generator, hidden_size, num_heads * head_dim, std=context_scale * layer_std * 4.0)
        tensors[prefix + "mlp.gate_proj.weight"] = _normal(
            generator, intermediate_size, hidden_size, std=layer_std)
        tensors[prefix + "mlp.up_proj.weight"] = _normal(
            generator, intermediate_size, hidden_size, std=layer_std)
        tensors[prefix + "mlp.down_proj.weight"] = _normal(
            generator, hidden_size, intermediate_size, std=context_scale * 4.0 / intermediate_size**0.5)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "model.safetensors"))

    eos_id = tokenizer_json["model"]["vocab"][EOS_TOKEN]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": tokenizer_json["model"]["vocab"][SPECIAL_TOKENS[0]],
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "bos_token_id": eos_id}, indent=2)
    )
    record = {"seed": seed, "successor": {str(k): v for k, v in successor.items()},
              "subset": subset.tolist()}
    (directory / TINY_TARGET_RECORD).write_text(json.dumps(record))
    return directory


def make_tiny_eagle3_head(
    directory: str | Path,
    target_dir: str | Path,
    aux_layer_ids: tuple[int, ...] | list[int] = (1, 2, 3),
    *,
    hidden_size: int | None = None,
    target_hidden_size: int | None = None,
    intermediate_size: int = 256,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    seed: int = 1,
    layer_scale: float = 0.05,
    logit_scale: float = 0.04,
) -> Path:
    """Write an EAGLE-3 head for a :func:`make_tiny_llama` target into ``directory``.

    Tensor names and config fields are the ones vLLM 0.32's ``LlamaForCausalLMEagle3`` loads.
    ``target_hidden_size`` overrides the recorded target width (to build a mismatching head on
    purpose); ``hidden_size`` defaults to the target's. The draft vocabulary is the target's
    subset S (``d2t`` maps draft ids to target ids). ``logit_scale`` scales the lm_head so that
    the draft distributions are confident but not one-hot (the policy state varies).
    """
    directory = Path(directory)
    target_dir = Path(target_dir)
    target_config = json.loads((target_dir / "config.json").read_text())
    record_path = target_dir / TINY_TARGET_RECORD
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} is missing: target_dir must come from make_tiny_llama")
    record = json.loads(record_path.read_text())
    successor = {int(k): v for k, v in record["successor"].items()}
    subset: list[int] = record["subset"]
    target_hidden = target_hidden_size or target_config["hidden_size"]
    hidden = hidden_size or target_config["hidden_size"]
    if hidden % num_heads != 0:
        raise ValueError(f"hidden_size={hidden} must be divisible by num_heads={num_heads}")
    head_dim = hidden // num_heads
    vocab_size = target_config["vocab_size"]
    draft_vocab = sorted(subset)
    draft_vocab_size = len(draft_vocab)

    generator = torch.Generator().manual_seed(seed)
    target_tensors = _load_safetensors(target_dir / "model.safetensors")
    target_embed = target_tensors["model.embed_tokens.weight"]  # [vocab, target_hidden]
    predecessor_of_predecessor = {successor[successor[t]]: t for t in successor}

    lm_head = torch.zeros(draft_vocab_size, hidden)  # [draft_vocab, hidden]
    if hidden == target_embed.shape[1]:
        for draft_id, token in enumerate(draft_vocab):
            lm_head[draft_id] = target_embed[predecessor_of_predecessor[token]] * logit_scale
    else:
        lm_head.copy_(_normal(generator, draft_vocab_size, hidden, std=1.0))
    fc = torch.zeros(hidden, len(aux_layer_ids) * target_hidden)  # [hidden, 3 * target_hidden]
    width = min(hidden, target_hidden)
    fc[:width, :width] = torch.eye(width)
    layer_std = layer_scale / hidden**0.5
    tensors = {
        "midlayer.self_attn.q_proj.weight": _normal(generator, num_heads * head_dim, 2 * hidden, std=layer_std),
        "midlayer.self_attn.k_proj.weight": _normal(generator, num_kv_heads * head_dim, 2 * hidden, std=layer_std),
        "midlayer.self_attn.v_proj.weight": _normal(generator, num_kv_heads * head_dim, 2 * hidden, std=layer_std),
        "midlayer.self_attn.o_proj.weight": _normal(generator, hidden, num_heads * head_dim, std=layer_std),
        "midlayer.mlp.gate_proj.weight": _normal(generator, intermediate_size, hidden, std=layer_std),
        "midlayer.mlp.up_proj.weight": _normal(generator, intermediate_size, hidden, std=layer_std),
        "midlayer.mlp.down_proj.weight": _normal(generator, hidden, intermediate_size, std=layer_std),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "fc.weight": fc,
        "lm_head.weight": lm_head,
        # target_id = draft_id + d2t[draft_id]
        "d2t": torch.tensor([token - i for i, token in enumerate(draft_vocab)], dtype=torch.int64),
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "model.safetensors"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": target_config["max_position_embeddings"],
        "rms_norm_eps": target_config["rms_norm_eps"],
        "rope_theta": target_config["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": target_config["rope_theta"]},
        "tie_word_embeddings": False,
        "vocab_size": vocab_size,
        "draft_vocab_size": draft_vocab_size,
        "target_hidden_size": target_hidden,
        "torch_dtype": "float32",
        "dtype": "float32",
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
            "use_aux_hidden_state": True,
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _simulated_draft_logprobs(
    head_dir: Path, target_dir: str | Path, steps: int, seed: int, num_rounds: int = 512
) -> torch.Tensor:
    """Approximate draft log-prob rows ``[num_rounds, steps, draft_vocab]`` of a tiny head.

    The head's residual is about the target embedding of a token of S plus the target layers'
    contribution (std about 1.5 per channel for the default context_scale); its
    deeper calls see about the same residual again (see the module doc).
    """
    generator = torch.Generator().manual_seed(seed + 7)
    record = json.loads((Path(target_dir) / TINY_TARGET_RECORD).read_text())
    embed = _load_safetensors(Path(target_dir) / "model.safetensors")["model.embed_tokens.weight"]
    lm_head = _load_safetensors(head_dir / "model.safetensors")["lm_head.weight"]  # [draft_vocab, hidden]
    subset = torch.tensor(record["subset"])
    tokens = subset[torch.randint(len(subset), (num_rounds,), generator=generator)]
    residual = embed[tokens].unsqueeze(1) + _normal(generator, num_rounds, steps, embed.shape[1], std=1.5)
    normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5)
    return torch.log_softmax(normed @ lm_head.t(), dim=-1)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def make_random_policy(
    directory: str | Path,
    *,
    top_k: int = 4,
    threshold: float = 0.5,
    seed: int = 0,
    continue_rate: float = 0.6,
    calibration_logprobs: torch.Tensor | None = None,
    score_floor: float = -30.0,
) -> Path:
    """Write a random stop policy (``policy.safetensors`` + ``policy.json``) into ``directory``.

    Random weights make the decisions depend on the state and, through the LSTM, on the step.
    The continue logit's bias is then tuned by bisection so that, over simulated chain rounds,
    about ``continue_rate`` of the decisions of still-active requests continue under
    ``threshold``: requests stop at varied depths. ``calibration_logprobs`` ``[N, steps, vocab]``
    are draft log-prob rows of ``N`` simulated rounds (random peaked distributions by default).
    """
    from radar_vllm.core.policy_state import chain_round_states
    from radar_vllm.core.policy import PolicyConfig, StopPolicy, save_policy

    if not 0.0 < continue_rate < 1.0:
        raise ValueError(f"continue_rate must be in (0, 1), got {continue_rate}")
    generator = torch.Generator().manual_seed(seed)
    config = PolicyConfig(state_size=top_k, threshold=threshold, score_floor=score_floor)
    policy = StopPolicy(config)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    policy.eval()
    if calibration_logprobs is None:
        logits = torch.randn(256, 6, 64, generator=generator) * 3.0
        calibration_logprobs = torch.log_softmax(logits, dim=-1)
    states = policy.features(chain_round_states(calibration_logprobs, top_k).flatten(0, 1)).view(
        calibration_logprobs.shape[0], calibration_logprobs.shape[1], top_k
    )  # [N, steps, top_k]
    out_layer = _final_linear(policy)
    with torch.no_grad():
        margins = policy(states)  # [N, steps, 2]
        margins = (margins[..., 1] - margins[..., 0]).float()  # continue minus stop logit
        threshold_logit = torch.logit(torch.tensor(float(threshold)).clamp(1e-6, 1 - 1e-6)).item()

        def continue_fraction(shift: float) -> float:
            flags = (margins + shift) >= threshold_logit  # [N, steps]
            alive = torch.cumprod(flags.float(), dim=1)  # still drafting after each step
            before = torch.cat([torch.ones_like(alive[:, :1]), alive[:, :-1]], dim=1)
            return float(alive.sum() / before.sum())

        low, high = -50.0, 50.0
        for _ in range(60):
            mid = (low + high) / 2
            if continue_fraction(mid) < continue_rate:
                low = mid
            else:
                high = mid
        out_layer.bias[1] += (low + high) / 2
    directory = Path(directory)
    save_policy(policy, config, directory)
    return directory


def _final_linear(policy: torch.nn.Module) -> torch.nn.Linear:
    last = None
    for module in policy.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == 2:
            last = module
    if last is None:
        raise ValueError("the policy has no Linear(..., 2) output layer")
    return last


def make_tiny_radar_checkpoint(
    directory: str | Path,
    target_dir: str | Path,
    *,
    top_k: int = 4,
    max_depth: int = 4,
    threshold: float = 0.5,
    continue_rate: float = 0.6,
    policy_seed: int = 7,
    skip_drafting: str = "never",
    sampled_policy_seed: int | None = None,
) -> Path:
    """Head (:func:`make_tiny_eagle3_head`) + random policy packed as a RADAR checkpoint.

    ``skip_drafting`` defaults to "never" so that every round drafts (a random head would make the
    depth-0 gate skip most rounds); tests of depth 0 pass "auto" or set the proposer's gate.

    Returns ``directory / "radar"``; the plain head is ``directory / "head"``. With the defaults
    the simulated rounds stop at every depth 1..4 (policy seed 7: about 41/4/29/25 % of the
    requests at depths 1/2/3/4). ``sampled_policy_seed``: also pack a second random policy (that
    seed) as the policy of sampled requests.
    """
    from radar_vllm.offline.pack import pack_radar_checkpoint

    directory = Path(directory)
    head = make_tiny_eagle3_head(directory / "head", target_dir)
    policy = make_random_policy(
        directory / "policy",
        top_k=top_k,
        threshold=threshold,
        seed=policy_seed,
        continue_rate=continue_rate,
        calibration_logprobs=_simulated_draft_logprobs(head, target_dir, max_depth, seed=0),
    )
    sampled = None
    if sampled_policy_seed is not None:
        sampled = make_random_policy(
            directory / "policy-sampled", top_k=top_k, threshold=threshold, seed=sampled_policy_seed,
            continue_rate=continue_rate,
            calibration_logprobs=_simulated_draft_logprobs(head, target_dir, max_depth, seed=1))
    return pack_radar_checkpoint(head, policy, directory / "radar", top_k=top_k, max_depth=max_depth,
                                 skip_drafting=skip_drafting, sampled_policy_path=sampled)


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str], also_restore: Iterable[str] = ()) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block; afterwards restore those keys and
    ``also_restore`` (keys the block may set or remove itself) to what they were."""
    keys = list(values) + [key for key in also_restore if key not in values]
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine core now (tests start several engines in one process)."""
    import gc

    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()
