"""Prompt loaders: counts, content, chat template, the fixed ShareGPT split."""
from __future__ import annotations

import pytest

from radar_vllm.offline import prompts
from tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_mtbench_has_80_two_turn_questions() -> None:
    loaded = prompts.load_mtbench()
    assert len(loaded) == 80
    assert len({p.prompt_id for p in loaded}) == 80
    for prompt in loaded:
        assert len(prompt.turns) == 2 and all(turn.strip() for turn in prompt.turns)
        assert prompt.messages == ({"role": "user", "content": prompt.turns[0]},)
    assert len({p.category for p in loaded}) == 8
    second = prompts.mtbench_second_turn_messages(loaded[0].turns, "An answer.")
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[2]["content"] == loaded[0].turns[1]


def test_humaneval_has_164_problems_with_stubs() -> None:
    loaded = prompts.load_humaneval()
    assert len(loaded) == 164
    assert loaded[0].prompt_id == "HumanEval/0"
    assert all("def " in p.messages[0]["content"] for p in loaded)


def test_sharegpt_recovers_every_complete_conversation() -> None:
    conversations = prompts.load_sharegpt_conversations()
    assert len(conversations) == prompts.SHAREGPT_EXPECTED_CONVERSATIONS
    assert all("conversations" in c and "id" in c for c in conversations)


def test_decode_json_array_items_stops_at_truncation() -> None:
    items, complete = prompts.decode_json_array_items('[{"a": 1}, {"b": [2, 3]}, {"c": "tru')
    assert items == [{"a": 1}, {"b": [2, 3]}] and complete is False
    items, complete = prompts.decode_json_array_items('[1, 2]')
    assert items == [1, 2] and complete is True


def test_sharegpt_split_is_disjoint_stable_and_keeps_chunks_together() -> None:
    train = prompts.load_sharegpt("train")
    heldout = prompts.load_sharegpt("heldout")
    everything = prompts.load_sharegpt("all")
    train_ids = {p.prompt_id for p in train}
    heldout_ids = {p.prompt_id for p in heldout}
    assert not train_ids & heldout_ids
    assert train_ids | heldout_ids == {p.prompt_id for p in everything}
    fraction = len(heldout) / len(everything)
    assert 0.03 < fraction < 0.07
    assert all(p.messages[0]["role"] == "user" and p.messages[0]["content"].strip() for p in train)
    # Chunks of one conversation ("X_0", "X_1", ...) share a side; the split is a pure function.
    assert prompts.sharegpt_split_of("abc_0") == prompts.sharegpt_split_of("abc_7")
    assert prompts.sharegpt_base_id("QWJhYvA_12") == "QWJhYvA"
    assert [prompts.sharegpt_split_of(p.prompt_id[len("sharegpt-"):]) for p in heldout[:50]] == ["heldout"] * min(50, len(heldout))
    with pytest.raises(ValueError, match="split='test'"):
        prompts.load_sharegpt("test")  # type: ignore[arg-type]


def test_chat_template_is_applied(tokenizer) -> None:
    loaded = prompts.load_mtbench()[:3]
    texts = prompts.chat_texts(tokenizer, loaded)
    for prompt, text in zip(loaded, texts):
        assert text.startswith("<|im_start|>user\n")
        assert text.endswith("<|im_start|>assistant\n")
        assert prompt.turns[0] in text
    ids = prompts.tokenize_prompts(tokenizer, loaded)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(row[0] == start and len(row) > 5 for row in ids)


def test_unknown_prompt_set_is_rejected() -> None:
    with pytest.raises(ValueError, match="name='gsm8k'"):
        prompts.load_prompt_set("gsm8k")
