"""Depth 0: whether an engine step drafts at all, from step costs the engine measures itself.

A speculative step pays only if the tokens it yields per request, divided by its wall time, beat
one token per request in the time of a plain decode step. Both sides depend on the load (batch
size), the machine, the temperature mix and how well the head fits the current text, so the gate
does not read them from a table: it measures them. For each batch-size bucket it keeps two
exponential moving averages, one per arm (the step drafted / the step did not):
seconds per step and tokens emitted per request per step. A round drafts when the drafting arm's
rate (tokens per request per second) is the higher one. Every ``probe_every`` rounds of a bucket
it takes the other arm once, so that an arm that became better (a calmer batch, an easier text)
is noticed; an arm with fewer than ``min_observations`` measurements is tried first.

Which requests skipped does not change any output: verification is lossless whatever was drafted,
and the drafter catches up on skipped tokens before it drafts again
(:mod:`radar_vllm.vllm.catch_up`). No vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DRAFT = True
SKIP = False


def batch_bucket(batch_size: int) -> int:
    """Buckets 1, 2, 3-4, 5-8, ... (index = ceil(log2(batch_size)))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (batch_size - 1).bit_length()


@dataclass
class ArmEstimate:
    """Moving averages for one arm of one bucket."""

    seconds: float = 0.0  # wall seconds per step
    tokens: float = 0.0  # tokens emitted per request per step
    count: int = 0

    def update(self, seconds: float, tokens: float, smoothing: float) -> None:
        if self.count == 0:
            self.seconds, self.tokens = seconds, tokens
        else:
            self.seconds += smoothing * (seconds - self.seconds)
            self.tokens += smoothing * (tokens - self.tokens)
        self.count += 1

    @property
    def rate(self) -> float:
        """Tokens per request per second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BucketState:
    draft: ArmEstimate = field(default_factory=ArmEstimate)
    skip: ArmEstimate = field(default_factory=ArmEstimate)
    rounds_since_probe: int = 0

    def arm(self, drafted: bool) -> ArmEstimate:
        return self.draft if drafted else self.skip


class DraftGate:
    """Chooses per engine step whether to draft (see the module docstring)."""

    def __init__(self, probe_every: int = 40, min_observations: int = 3, smoothing: float = 0.15) -> None:
        if probe_every < 2:
            raise ValueError(f"probe_every must be >= 2, got {probe_every}")
        if min_observations < 1:
            raise ValueError(f"min_observations must be >= 1, got {min_observations}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.probe_every = probe_every
        self.min_observations = min_observations
        self.smoothing = smoothing
        self.buckets: dict[int, BucketState] = {}

    def _bucket(self, batch_size: int) -> BucketState:
        return self.buckets.setdefault(batch_bucket(batch_size), BucketState())

    def preferred(self, batch_size: int) -> bool:
        """The arm with the higher measured rate (no exploration)."""
        state = self._bucket(batch_size)
        return state.draft.rate >= state.skip.rate

    def decide(self, batch_size: int) -> bool:
        """``DRAFT`` or ``SKIP`` for a round of ``batch_size`` requests."""
        state = self._bucket(batch_size)
        if state.draft.count < self.min_observations:
            return DRAFT
        if state.skip.count < self.min_observations:
            return SKIP
        choice = self.preferred(batch_size)
        state.rounds_since_probe += 1
        if state.rounds_since_probe >= self.probe_every:
            state.rounds_since_probe = 0
            return not choice
        return choice

    def observe(self, batch_size: int, drafted: bool, seconds: float, tokens_per_request: float) -> None:
        """One measured step: ``seconds`` from the round's decision to the next one, and the tokens
        per request the step emitted (1 when it verified nothing)."""
        if seconds <= 0 or tokens_per_request <= 0:
            return
        self._bucket(batch_size).arm(drafted).update(seconds, tokens_per_request, self.smoothing)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per bucket (largest batch size in it): both arms' rates and counts (for logs and tests)."""
        return {str(1 << index): {"draft_rate": state.draft.rate, "skip_rate": state.skip.rate,
                                  "draft_tokens": state.draft.tokens, "draft_steps": state.draft.count,
                                  "skip_steps": state.skip.count}
                for index, state in sorted(self.buckets.items())}
