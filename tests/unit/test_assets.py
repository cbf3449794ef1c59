"""GGUF -> HF conversion on a tiny synthetic GGUF, digest/truncation/architecture errors, cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radar_vllm.offline import assets
from tiny_models import make_tiny_llama

NUM_HEADS = 2
NUM_KV_HEADS = 1


def _to_gguf_rows(weight: torch.Tensor, heads: int) -> np.ndarray:
    """Interleave each head's rotary halves the way GGUF files store q/k projections."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols).numpy()


def write_tiny_gguf(path: Path, hf_dir: Path, architecture: str = "llama") -> dict[str, torch.Tensor]:
    """A float32 GGUF file holding the tiny HF Llama in ``hf_dir``; returns its HF tensors."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(50000.0)
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", tensors["lm_head.weight"].numpy())
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            weight = tensors[f"model.layers.{layer}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                array = _to_gguf_rows(weight, config["num_attention_heads"])
            elif gguf_name == "attn_k.weight":
                array = _to_gguf_rows(weight, config["num_key_value_heads"])
            else:
                array = weight.numpy()
            writer.add_tensor(f"blk.{layer}.{gguf_name}", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = make_tiny_llama(root / "hf", hidden_size=64, num_layers=2, num_heads=NUM_HEADS,
                             num_kv_heads=NUM_KV_HEADS, intermediate_size=96, seed=3)
    path = root / "tiny.gguf"
    tensors = write_tiny_gguf(path, hf_dir)
    return path, tensors


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    path, _ = tiny_gguf
    out = tmp_path_factory.mktemp("converted") / "model"
    return assets.convert_gguf_to_hf(path, out, expected_sha256=assets.sha256_file(path), progress=False)


def test_conversion_restores_hf_tensors_and_config(tiny_gguf, converted: Path) -> None:
    from safetensors.torch import load_file

    _, original = tiny_gguf
    restored = load_file(str(converted / "model.safetensors"))
    assert set(restored) == set(original)
    for name, tensor in original.items():
        assert restored[name].dtype == torch.bfloat16
        # bf16 rounding of the float32 originals, bit for bit (q/k un-interleaved correctly).
        assert torch.equal(restored[name], tensor.to(torch.bfloat16)), name
    config = json.loads((converted / "config.json").read_text())
    assert config["rope_theta"] == 50000.0
    assert config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == NUM_KV_HEADS
    assert (converted / "chat_template.jinja").read_text().startswith("{% for message")
    assert json.loads((converted / assets.CONVERSION_RECORD).read_text())["source_sha256"]


def test_transformers_loads_conversion_and_matches_original(tiny_gguf, converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _, original = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    reference = LlamaForCausalLM(LlamaConfig(**{
        k: v for k, v in json.loads((converted / "config.json").read_text()).items()
        if k not in ("architectures", "torch_dtype")
    }))
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in original.items()})
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("The quick brown fox")["input_ids"]) == "The quick brown fox"


def test_digest_mismatch_is_rejected_and_writes_nothing(tiny_gguf, tmp_path: Path) -> None:
    path, _ = tiny_gguf
    out = tmp_path / "model"
    with pytest.raises(ValueError, match="sha256"):
        assets.convert_gguf_to_hf(path, out, expected_sha256="0" * 64, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_rejected(tiny_gguf, tmp_path: Path) -> None:
    path, _ = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="truncated|not a readable GGUF"):
        assets.convert_gguf_to_hf(truncated, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_wrong_architecture_is_rejected(tmp_path: Path) -> None:
    hf_dir = make_tiny_llama(tmp_path / "hf", hidden_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, intermediate_size=64, seed=4)
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, hf_dir, architecture="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        assets.convert_gguf_to_hf(path, tmp_path / "model", progress=False)


def test_existing_output_is_not_overwritten(tiny_gguf, tmp_path: Path) -> None:
    path, _ = tiny_gguf
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        assets.convert_gguf_to_hf(path, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    assert assets.smollm2_dir() == tmp_path / "cache" / assets.SMOLLM2_DIRNAME
    monkeypatch.delenv(assets.CACHE_ENV_VAR)
    assert assets.cache_dir() == Path("~/.cache/radar_vllm").expanduser()


def test_missing_package_names_the_pip_command() -> None:
    spec = assets.PackagedFile("radar_no_such_module_xyz", "x.bin", "pip install radar-no-such==1.0")
    with pytest.raises(FileNotFoundError, match="pip install radar-no-such==1.0"):
        assets.packaged_file(spec)


def test_real_smollm2_conversion_when_cached() -> None:
    folder = assets.smollm2_dir()
    if not (folder / assets.CONVERSION_RECORD).is_file():
        pytest.skip("SmolLM2 not converted in this cache (run `radar-vllm assets`)")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == assets.SMOLLM2_ROPE_THETA
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    record = json.loads((folder / assets.CONVERSION_RECORD).read_text())
    assert record["source_sha256"] == assets.SMOLLM2_GGUF_SHA256
    assert assets.ensure_smollm2() == folder


def test_shipped_checkpoints_are_found() -> None:
    shipped = assets.shipped_checkpoints()
    assert {"smollm2-135m-eagle3", "smollm2-135m-radar"} <= set(shipped)
    assert all(Path(path, "config.json").is_file() for path in shipped.values())
