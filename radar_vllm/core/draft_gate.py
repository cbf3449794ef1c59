"""How deep a batch may draft this engine step (0 = not at all), from step costs the engine measures.

A speculative step pays only if the tokens it yields per request, divided by its wall time, beat
one token per request in the time of a plain decode step. Both sides depend on the load (batch
size), the machine, the temperature mix and how well the head fits the current text, so the gate
does not read them from a table: it measures them. It chooses among a few depth caps (the arms, by
default 0, 1, 2, 4 and the checkpoint's maximum depth; the stop policy decides per request below
the cap). On a CPU a step's cost is not even monotone in its tokens: the target's matrix products
run faster on 4-6 rows than on 1-3 or 8 (oneDNN picks other kernels), so a batch-1 round that
verifies 4 or 5 tokens can cost less than one that verifies 2. For each batch-size bucket (batches
in which some request samples apart from greedy ones: they accept fewer drafts) and arm it keeps
moving averages of seconds per step and tokens emitted per request per step (over about the same
number of request-steps in every bucket), and takes the arm with the highest rate (tokens per
request per second). When the caller passes each request's emitted tokens, a round under one cap
also tells what every shallower cap would have emitted on the same text: the first draft calls and
stop decisions are the same below the cap, so a request's accepted prefix is cut at the cap (tree
levels alike). The gate therefore keeps, per depth j, how often a request gets at least j drafts
accepted, from every round whose cap reaches j, and a drafting cap c yields 1 + the sum of those
rates for j <= c: two drafting caps differ only in the depths between them, measured on the same
rounds, which removes most of the token noise from comparing them. One step of a small batch says
little (at batch 1 a step yields 1 or 2 tokens), so every measurement of an arm spans about
``probe_requests`` request-steps: a probe of a bucket whose batches hold up to B requests lasts
``ceil(probe_requests / B)`` rounds.

Arms are measured shallowest first. Measuring costs the rounds spent on the worse arms, so a
bucket met for the first time (a batch that drains from 16 to 1 passes through five) starts from
the nearest bucket's estimates instead of measuring every arm again: its choice is the
neighbour's, and the first measurement of an arm in the new bucket rescales the step times of the
arms it has not measured yet by the same factor, so they keep the neighbour's ratios until each is
measured. Afterwards the gate probes the other arms, one at a time, every ``probe`` rounds of the
bucket: the interval starts at ``probe_every`` and doubles (up to ``max_probe_every``) each time a
probe leaves the choice unchanged, and falls back to ``probe_every`` when the choice changes, so a
settled bucket spends little on probes while a change (a calmer batch, an easier text) is still
noticed. A step that caught up on many skipped rounds at once is not counted for its arm.

Which cap a round used does not change any output: verification is lossless whatever was drafted,
and the drafter catches up on skipped tokens before it drafts again
(:mod:`radar_vllm.vllm.catch_up`). No vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def batch_bucket(batch_size: int) -> int:
    """Buckets 1, 2, 3-4, 5-8, ... (index = ceil(log2(batch_size)))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (batch_size - 1).bit_length()


@dataclass
class ArmEstimate:
    """Moving averages for one arm of one bucket."""

    seconds: float = 0.0  # wall seconds per step
    tokens: float = 0.0  # tokens emitted per request per step (its own steps)
    count: int = 0  # measured steps in this bucket
    seeded: bool = False  # the estimates come from a neighbouring bucket (count is 0)

    @property
    def known(self) -> bool:
        return self.count > 0 or self.seeded

    def update(self, seconds: float, tokens: float, smoothing: float) -> None:
        """A running mean over the first ``1 / smoothing`` steps, a moving average after."""
        self.count += 1
        self.seeded = False
        weight = max(smoothing, 1.0 / self.count)
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens - self.tokens)


@dataclass
class DepthReach:
    """How often a request of this bucket gets at least ``depth`` drafts accepted (moving average
    over the rounds whose cap reached that depth)."""

    rate: float = 0.0
    count: int = 0
    seeded: bool = False

    @property
    def known(self) -> bool:
        return self.count > 0 or self.seeded

    def update(self, value: float, smoothing: float) -> None:
        self.count += 1
        self.seeded = False
        self.rate += max(smoothing, 1.0 / self.count) * (value - self.rate)


@dataclass
class BucketState:
    arms: dict[int, ArmEstimate]
    reach: list[DepthReach]  # index j - 1: at least j drafts accepted
    probe_interval: int
    rounds_since_probe: int = 0
    next_probe: int = 0  # index into the other arms, round robin
    probing: int | None = None  # the arm a probe is measuring (its last observation ends the probe)
    probe_left: int = 0  # rounds of the probe still to run after the current one
    chosen_before_probe: int | None = None


class DraftGate:
    """Chooses a depth cap per engine step (see the module docstring)."""

    def __init__(self, max_depth: int, arms: Sequence[int] | None = None, probe_every: int = 16,
                 max_probe_every: int = 256, min_observations: int = 3, smoothing: float = 0.15,
                 probe_requests: int = 8) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        caps = sorted(set(arms if arms is not None else (0, 1, min(2, max_depth), min(4, max_depth), max_depth)))
        if len(caps) < 2 or caps[0] < 0 or caps[-1] > max_depth:
            raise ValueError(f"arms must hold at least two depth caps in [0, {max_depth}], got {list(caps)}")
        if not 2 <= probe_every <= max_probe_every:
            raise ValueError(f"need 2 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        if min_observations < 1:
            raise ValueError(f"min_observations must be >= 1, got {min_observations}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if probe_requests < 1:
            raise ValueError(f"probe_requests must be >= 1, got {probe_requests}")
        self.probe_requests = probe_requests
        self.caps = caps
        self.max_depth = max_depth
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.min_observations = min_observations
        self.smoothing = smoothing
        self.buckets: dict[tuple[bool, int], BucketState] = {}  # (sampling, bucket index) -> state

    def _bucket(self, batch_size: int, sampling: bool = False) -> BucketState:
        key = (sampling, batch_bucket(batch_size))
        if key not in self.buckets:
            arms = {cap: ArmEstimate() for cap in self.caps}
            reach = [DepthReach() for _ in range(self.max_depth)]
            known = [other for other, state in self.buckets.items() if any(a.known for a in state.arms.values())]
            if known:  # start from the nearest bucket's estimates: nearest size first (the load
                # decides more than the temperature), then the same kind of batch, then the smaller
                nearest = self.buckets[min(known, key=lambda other: (abs(other[1] - key[1]), other[0] != sampling,
                                                                     other[1]))]
                for cap, arm in nearest.arms.items():
                    if arm.known:
                        arms[cap] = ArmEstimate(arm.seconds, arm.tokens, seeded=True)
                reach = [DepthReach(depth.rate, seeded=True) if depth.known else DepthReach()
                         for depth in nearest.reach]
            self.buckets[key] = BucketState(arms, reach, self.probe_every)
        return self.buckets[key]

    @staticmethod
    def _tokens(state: BucketState, cap: int) -> float:
        """Tokens per request per step under ``cap``: from the per-depth acceptance when every depth
        up to the cap has been seen, else the arm's own average."""
        reach = state.reach[:cap]
        if cap > 0 and all(depth.known for depth in reach):
            return 1.0 + sum(depth.rate for depth in reach)
        return state.arms[cap].tokens

    def _rate(self, state: BucketState, cap: int) -> float:
        """Tokens per request per second under ``cap``."""
        seconds = state.arms[cap].seconds
        return self._tokens(state, cap) / seconds if seconds > 0 else 0.0

    def preferred(self, batch_size: int, sampling: bool = False) -> int:
        """The arm with the highest estimated rate (no exploration; ties go to the shallower cap)."""
        state = self._bucket(batch_size, sampling)
        return max(self.caps, key=lambda cap: (self._rate(state, cap), -cap))

    def probe_rounds(self, batch_size: int) -> int:
        """Rounds one measurement of an arm lasts in ``batch_size``'s bucket."""
        largest = 1 << batch_bucket(batch_size)
        return -(-self.probe_requests // largest)

    def decide(self, batch_size: int, sampling: bool = False) -> int:
        """The depth cap (0: no drafting) for a round of ``batch_size`` requests (``sampling``: some
        of them sample, T > 0; such batches accept fewer drafts and are measured apart)."""
        state = self._bucket(batch_size, sampling)
        needed = max(self.min_observations, self.probe_rounds(batch_size))
        for cap in self.caps:  # arms not measured enough first, the shallowest first
            arm = state.arms[cap]
            if not arm.seeded and arm.count < needed:
                return cap
        if state.probing is not None and state.probe_left > 0:
            state.probe_left -= 1
            return state.probing
        choice = self.preferred(batch_size, sampling)
        state.rounds_since_probe += 1
        if state.rounds_since_probe >= state.probe_interval:  # (a probe never observed is replaced)
            others = [cap for cap in self.caps if cap != choice]
            state.rounds_since_probe = 0
            state.probing = others[state.next_probe % len(others)]
            state.probe_left = self.probe_rounds(batch_size) - 1
            state.next_probe += 1
            state.chosen_before_probe = choice
            return state.probing
        return choice

    def observe(self, batch_size: int, cap: int, seconds: float, tokens: float | Sequence[int],
                typical: bool = True, sampling: bool = False) -> None:
        """One measured step: ``seconds`` from the round's decision to the next one, and the tokens
        the step emitted: per request (a sequence; then every depth up to the cap learns how often
        it is reached), or their mean per request (1 when it verified nothing). ``typical=False``:
        the step did extra work that says nothing about its arm (the drafter catching up on many
        skipped rounds at once); it is not counted, and a probe that ends on it runs one round longer."""
        per_request = None if isinstance(tokens, (int, float)) else [int(t) for t in tokens]
        mean_tokens = float(tokens) if per_request is None else sum(per_request) / max(1, len(per_request))
        if cap not in self.caps or seconds <= 0 or mean_tokens <= 0:
            return
        state = self._bucket(batch_size, sampling)
        if not typical:
            if state.probing == cap and state.probe_left == 0:
                state.probe_left = 1
            return
        arm = state.arms[cap]
        if arm.seeded:  # the first measurement here: carry the neighbour's ratios to the other seeds
            factor = seconds / arm.seconds if arm.seconds > 0 else 1.0
            for other in state.arms.values():
                if other is not arm and other.seeded:
                    other.seconds *= factor
        # a step of a small batch is a small sample (at batch 1 it yields 1 or 2 tokens): average
        # over about as many request-steps in every bucket
        smoothing = self.smoothing * min(1.0, batch_size / self.probe_requests)
        arm.update(seconds, mean_tokens, smoothing)
        if per_request:
            for depth in range(1, cap + 1):  # accepted >= depth, i.e. emitted > depth
                state.reach[depth - 1].update(sum(t > depth for t in per_request) / len(per_request), smoothing)
        if state.probing == cap and state.probe_left == 0:
            same = self.preferred(batch_size, sampling) == state.chosen_before_probe
            state.probe_interval = min(2 * state.probe_interval, self.max_probe_every) if same else self.probe_every
            state.probing = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per bucket (largest batch size in it, ``"s"`` appended for batches that sample): every
        arm's rate, tokens and step count, how often each depth is accepted, and the probe interval
        (for logs and tests)."""
        out: dict[str, dict[str, float]] = {}
        for (sampling, index), state in sorted(self.buckets.items()):
            entry: dict[str, float] = {"probe_interval": state.probe_interval}
            for cap, arm in state.arms.items():
                entry[f"rate_d{cap}"] = self._rate(state, cap)
                entry[f"tokens_d{cap}"] = self._tokens(state, cap)
                entry[f"steps_d{cap}"] = arm.count
            for depth, reach in enumerate(state.reach, start=1):
                if reach.known:
                    entry[f"reach_{depth}"] = reach.rate
            out[f"{1 << index}{'s' if sampling else ''}"] = entry
        return out
