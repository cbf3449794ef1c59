"""Benchmark workloads as token ids: the same prompts for every configuration.

- ``mtbench``: MT-Bench first turns; ``mtbench-turn2``: the second turns, asked after the
  *no-speculation* greedy answer to the first turn (built by the no-speculation run, then handed
  to every other row, so all rows see identical turn-2 prompts);
- ``humaneval``: HumanEval problems as chat prompts;
- ``sharegpt``: the ShareGPT held-out split (never used to train the head), first user turns.

Selection: prompts whose templated length is at most ``max_prompt_tokens``, then
``num_prompts`` of them evenly spaced over the set (so MT-Bench's categories are all sampled).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from radar_vllm.offline.prompts import (
    Prompt,
    apply_chat_template,
    load_humaneval,
    load_mtbench,
    load_sharegpt,
    mtbench_second_turn_messages,
)

MTBENCH = "mtbench"
MTBENCH_TURN2 = "mtbench-turn2"
HUMANEVAL = "humaneval"
SHAREGPT = "sharegpt"
BASE_WORKLOADS = (MTBENCH, HUMANEVAL, SHAREGPT)
SHAREGPT_SPLIT = "heldout"


@dataclass
class Workload:
    """Prompts of one workload, in order, as token ids (chat template applied)."""

    name: str
    prompt_ids: list[list[int]]
    prompt_keys: list[str]  # prompt ids of the source set, same order
    # MT-Bench only: (first turn, second turn) texts per prompt, to build turn 2 later
    turns: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompt_ids) != len(self.prompt_keys):
            raise ValueError(
                f"workload {self.name!r}: {len(self.prompt_ids)} prompts but {len(self.prompt_keys)} keys"
            )

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    def head(self, count: int) -> "Workload":
        """The first ``count`` prompts (all of them when there are fewer)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        return Workload(name=self.name, prompt_ids=self.prompt_ids[:count], prompt_keys=self.prompt_keys[:count],
                        turns=self.turns[:count])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        return cls(**data)


def select_evenly(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer).

    Example: 10 items, count 3 -> indices 0, 3, 6 (floor(i * 10 / 3)).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def prompt_token_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of templated ``messages`` with the generation prompt (template holds the specials)."""
    text = apply_chat_template(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _source_prompts(name: str) -> list[Prompt]:
    if name == MTBENCH:
        return load_mtbench()
    if name == HUMANEVAL:
        return load_humaneval()
    if name == SHAREGPT:
        return load_sharegpt(SHAREGPT_SPLIT)
    raise ValueError(f"workload must be one of {BASE_WORKLOADS} (turn 2 is derived), got {name!r}")


def load_workload(name: str, tokenizer: Any, num_prompts: int, max_prompt_tokens: int) -> Workload:
    """``num_prompts`` prompts of ``name`` of at most ``max_prompt_tokens`` tokens, evenly spaced."""
    prompts = _source_prompts(name)
    fitting: list[tuple[Prompt, list[int]]] = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt.messages)
        if len(ids) <= max_prompt_tokens:
            fitting.append((prompt, ids))
    if not fitting:
        raise ValueError(f"no {name} prompt fits max_prompt_tokens={max_prompt_tokens}; raise it")
    chosen = select_evenly(fitting, num_prompts)
    return Workload(
        name=name,
        prompt_ids=[ids for _, ids in chosen],
        prompt_keys=[prompt.prompt_id for prompt, _ in chosen],
        turns=[list(prompt.turns[:2]) for prompt, _ in chosen] if name == MTBENCH else [],
    )


def build_second_turn(
    tokenizer: Any,
    first_turns: Workload,
    answers: Sequence[Sequence[int]],
    max_prompt_tokens: int,
) -> Workload:
    """MT-Bench turn 2 after the given turn-1 answers (token ids, e.g. no-speculation greedy).

    Prompts longer than ``max_prompt_tokens`` (or without a second turn) are left out.
    """
    if first_turns.name != MTBENCH:
        raise ValueError(f"turn 2 is built from the {MTBENCH!r} workload, got {first_turns.name!r}")
    if len(answers) != first_turns.num_prompts:
        raise ValueError(f"need one answer per turn-1 prompt: {first_turns.num_prompts} prompts, {len(answers)} answers")
    prompt_ids: list[list[int]] = []
    keys: list[str] = []
    for key, turns, answer in zip(first_turns.prompt_keys, first_turns.turns, answers):
        if len(turns) < 2:
            continue
        text = tokenizer.decode(list(answer), skip_special_tokens=True)
        ids = prompt_token_ids(tokenizer, mtbench_second_turn_messages(turns, text))
        if len(ids) <= max_prompt_tokens:
            prompt_ids.append(ids)
            keys.append(key)
    return Workload(name=MTBENCH_TURN2, prompt_ids=prompt_ids, prompt_keys=keys)


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
