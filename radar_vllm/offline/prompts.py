"""Prompt sets for evaluation and head training: MT-Bench, HumanEval and ShareGPT.

Each loader returns :class:`Prompt` records holding raw chat messages; :func:`apply_chat_template`
and :func:`tokenize_prompts` turn them into templated text or token ids with a target's
tokenizer. The ShareGPT file shipped upstream is truncated, so conversations are decoded one by
one and decoding stops at the first incomplete item.

ShareGPT train/held-out split: a conversation is held out when the first 8 bytes of
sha256(base id) read as a big-endian integer, modulo 100, are below
:data:`SHAREGPT_HELDOUT_PERCENT`. The base id is the conversation id without its ``_N`` chunk
suffix, so every chunk of one conversation falls on the same side. The split depends only on the
ids: it is stable across runs and machines.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from radar_vllm.offline.assets import (
    HUMANEVAL_PROBLEMS,
    MTBENCH_QUESTIONS,
    SHAREGPT_CONVERSATIONS,
    packaged_file,
)

logger = logging.getLogger(__name__)

SHAREGPT_HELDOUT_PERCENT = 5
SHAREGPT_EXPECTED_CONVERSATIONS = 17671
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"

Split = Literal["train", "heldout", "all"]
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: ``messages`` ends with the user turn to answer."""

    prompt_id: str
    source: str  # "mtbench" | "humaneval" | "sharegpt"
    messages: tuple[Message, ...]
    category: str | None = None
    # All user turns for multi-turn sets (MT-Bench has two); the first equals messages[-1].
    turns: tuple[str, ...] = ()


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


@functools.lru_cache(maxsize=1)
def _mtbench_rows() -> tuple[dict[str, Any], ...]:
    path = packaged_file(MTBENCH_QUESTIONS)
    with open(path, encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def load_mtbench() -> list[Prompt]:
    """The 80 MT-Bench questions, first turn as the prompt; both turns in ``turns``."""
    return [
        Prompt(
            prompt_id=f"mtbench-{row['question_id']}",
            source="mtbench",
            messages=(_user(row["turns"][0]),),
            category=row.get("category"),
            turns=tuple(row["turns"]),
        )
        for row in _mtbench_rows()
    ]


def mtbench_second_turn_messages(turns: Sequence[str], first_answer: str) -> tuple[Message, ...]:
    """Messages for MT-Bench turn 2 (``turns`` of a :class:`Prompt`): turn 1, the model's
    ``first_answer``, then turn 2."""
    if len(turns) < 2:
        raise ValueError(f"MT-Bench turn 2 needs two turns, got {len(turns)}")
    return (
        _user(turns[0]),
        {"role": "assistant", "content": first_answer},
        _user(turns[1]),
    )


def load_humaneval() -> list[Prompt]:
    """The 164 HumanEval problems as chat prompts (instruction + function stub)."""
    path = packaged_file(HUMANEVAL_PROBLEMS)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [
        Prompt(
            prompt_id=row["task_id"],
            source="humaneval",
            messages=(_user(HUMANEVAL_INSTRUCTION + "```python\n" + row["prompt"] + "```"),),
            category="code",
            turns=(HUMANEVAL_INSTRUCTION + "```python\n" + row["prompt"] + "```",),
        )
        for row in rows
    ]


def decode_json_array_items(text: str) -> tuple[list[Any], bool]:
    """Decode the items of a JSON array one by one; stop at the first incomplete item.

    Returns (items, complete) where ``complete`` tells whether the closing bracket was reached.
    """
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    items: list[Any] = []
    length = len(text)
    while True:
        while position < length and text[position] in " \t\r\n,":
            position += 1
        if position >= length:
            return items, False
        if text[position] == "]":
            return items, True
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return items, False
        items.append(item)


@functools.lru_cache(maxsize=1)
def load_sharegpt_conversations() -> tuple[dict[str, Any], ...]:
    """Every complete ShareGPT conversation in the (truncated) upstream file."""
    path = packaged_file(SHAREGPT_CONVERSATIONS)
    text = Path(path).read_text(encoding="utf-8")
    items, complete = decode_json_array_items(text)
    logger.info(
        "ShareGPT: recovered %d complete conversations from %s (file %s)",
        len(items), path, "complete" if complete else "truncated",
    )
    return tuple(items)


def sharegpt_base_id(conversation_id: str) -> str:
    """Conversation id without its ``_N`` chunk suffix."""
    head, sep, tail = conversation_id.rpartition("_")
    return head if sep and tail.isdigit() else conversation_id


def sharegpt_split_of(conversation_id: str) -> Literal["train", "heldout"]:
    """Which side of the fixed split a ShareGPT conversation id falls on (see module doc)."""
    digest = hashlib.sha256(sharegpt_base_id(conversation_id).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "heldout" if bucket < SHAREGPT_HELDOUT_PERCENT else "train"


def _sharegpt_messages(conversation: dict[str, Any]) -> list[Message]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}
    messages = []
    for turn in conversation.get("conversations", []):
        role = roles.get(turn.get("from", ""))
        value = turn.get("value", "")
        if role is None or not isinstance(value, str):
            continue
        messages.append({"role": role, "content": value})
    return messages


def load_sharegpt(split: Split = "train") -> list[Prompt]:
    """ShareGPT first user turns (non-empty) as prompts, from one side of the fixed split.

    ``messages`` holds the first user turn; ``turns`` holds every user turn of the conversation.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r}; expected 'train', 'heldout' or 'all'")
    prompts = []
    for conversation in load_sharegpt_conversations():
        conversation_id = str(conversation.get("id", ""))
        if split != "all" and sharegpt_split_of(conversation_id) != split:
            continue
        messages = _sharegpt_messages(conversation)
        if not messages or messages[0]["role"] != "user" or not messages[0]["content"].strip():
            continue
        user_turns = tuple(m["content"] for m in messages if m["role"] == "user")
        prompts.append(
            Prompt(
                prompt_id=f"sharegpt-{conversation_id}",
                source="sharegpt",
                messages=(messages[0],),
                turns=user_turns,
            )
        )
    return prompts


def load_prompt_set(name: str, split: Split = "train") -> list[Prompt]:
    """Load a prompt set by name: 'mtbench', 'humaneval', 'sharegpt' (``split`` applies)."""
    if name == "mtbench":
        return load_mtbench()
    if name == "humaneval":
        return load_humaneval()
    if name == "sharegpt":
        return load_sharegpt(split)
    raise ValueError(f"prompt set name={name!r}; expected 'mtbench', 'humaneval' or 'sharegpt'")


def apply_chat_template(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The templated text of ``messages`` with the assistant generation prompt appended."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True
    )


def chat_texts(tokenizer: Any, prompts: Iterable[Prompt]) -> list[str]:
    """Templated text of each prompt."""
    return [apply_chat_template(tokenizer, prompt.messages) for prompt in prompts]


def tokenize_prompts(tokenizer: Any, prompts: Iterable[Prompt]) -> list[list[int]]:
    """Token ids of each templated prompt (the template already holds the special tokens)."""
    return [
        list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in chat_texts(tokenizer, prompts)
    ]
