"""How deep a batch may draft this engine step (0 = not at all), from step costs the engine measures.

A speculative step pays only if the tokens it yields per request, divided by its wall time, beat
one token per request in the time of a plain decode step. Both sides depend on the load (batch
size), the machine, the temperature mix and how well the head fits the current text, so the gate
does not read them from a table: it measures them. It chooses among a few depth caps (the arms, by
default 0 to 4 and the checkpoint's maximum depth). In an engine, a cap below the maximum drafts a
chain of exactly that depth for every request (a stock EAGLE-3 round), and the deepest arm is
RADAR's round, whose stop policy decides per request how deep each chain or tree grows: the gate
runs the policy only where it measures faster than every fixed depth (on a 2-core CPU at batch 1
stock EAGLE-3 with K = 3 ran 6% faster than RADAR's chains under a policy trained with another
machine's costs). On a CPU a step's cost is not even monotone in its tokens: the target's matrix
products run faster on 4-6 rows than on 1-3 or 8 (oneDNN picks other kernels), so a batch-1 round that
verifies 4 or 5 tokens can cost less than one that verifies 2. For each batch-size bucket (batches
in which some request samples apart from greedy ones: they accept fewer drafts) and arm it keeps
moving averages of seconds per step and tokens emitted per request per step (over about the same
number of request-steps in every bucket), and takes the arm with the highest rate (tokens per
request per second). When the caller passes each request's emitted tokens, a round under one cap
also tells what every shallower cap would have emitted on the same text: the first draft calls are
the same below the cap, so a request's accepted prefix is cut at the cap (the policy's arm, whose
stop decisions and trees differ from the fixed chains', is one of ``own_arms``: its tokens are its
own). The gate therefore keeps, per depth j, how often draft j is accepted among the requests
that drafted it with drafts 1..j-1 accepted (counts over every round whose cap reaches j,
discounted as rounds pass), and how often a request gets at least j drafts accepted is the
product of those rates for depths 1..j (:func:`depth_reach`); a drafting cap c yields 1 + the sum
of these for j <= c. Two drafting caps differ only in the depths between them, measured on the
same rounds, which removes most of the token noise from comparing them, and every round informs
the shallow factors of a deep cap's product: at batch 1 a third draft is tried only in the rounds
whose first two were accepted (about one in six), so its own rate rests on few requests and is
drawn towards the second's by a few requests' worth (``depth_prior``); estimated instead as the
share of all depth-3 rounds that accepted three drafts, a run of unlucky probes once left depth 3
at zero and held the gate on depth 2 (stock K = 2 ran 8% slower than K = 3 there). The policy's chains (chain
mode) are the fixed chains cut where the policy stopped, so its rounds teach those rates too, each
depth from the requests that drafted it (:meth:`DraftGate._learn_depths`): the fixed depths are
then judged on the text the policy's rounds meet, not only on their own probes. One step of a small batch says
little (at batch 1 a step yields 1 or 2 tokens), so every measurement of an arm spans about
``probe_requests`` request-steps: a probe of a bucket whose batches hold up to B requests lasts
``ceil(probe_requests / B)`` rounds.

In a batch of more than one request, a drafting arm is chosen over depth 0 only when its rate
beats depth 0's by ``draft_margin`` (default 10%): drafting speeds requests up unevenly (one accepts
half its drafts, another few), so they finish at different steps and the batch drains through
steps of fewer requests, which cost more per token; a batch of 16 MT-Bench requests whose one-token
drafts gained about 5% per step finished about 4% later than without drafting. Depth 0 is also the
arm that cannot be slower than no speculation.

Arms are measured shallowest first. Measuring costs the rounds spent on the worse arms, so a
bucket met for the first time (a batch that drains from 16 to 1 passes through five; a server's
first burst may jump from 1 to 64) starts from the estimates of the nearest bucket known instead
of measuring every arm again: step times from the nearest (the other kind of batch of the same size
first, then the closest batch size, the smaller on a tie), tokens per request from the nearest of
the same kind, if any (a batch that samples accepts fewer drafts than a greedy batch of the same
size: a server's sampling batch of 5-8 seeded from a greedy table's drafted at an estimated 15.3
tokens/s per request against 11.9 at depth 0 and measured 8.1 against 9.3). Tokens per request
carry over as they are; what a drafting arm's step
costs beyond a depth-0 step grows with the rows it drafts and verifies, so that extra is scaled by
the ratio of the batch sizes (a batch of 1 gains from drafting on a CPU where a batch of 16 loses
40%; a deep tree round at batch 16 costs about 7 plain steps, at batch 64 about 16). Its choice is
then the scaled estimates'; the probes of arms whose rounds cost more than two of the chosen arm's
are scheduled as if each had been probed once (a batch of 16 that starts sampling does not try
every tree depth within its first rounds; cheap arms are still probed soon, which corrects a
choice that is wrong here), and the first measurement of an arm in the new bucket rescales the
step times of the arms it has not measured yet by the same factor, so they keep the seeded ratios
until each is measured. A bucket with no known bucket at all is measured from scratch, shallowest
first, but an arm deeper than a measured drafting arm that loses to depth 0 is estimated, not run
(drafting's extra cost growing with the depth, further depths accepted as often as the last), in a
batch of more than one request, and at batch 1 where that arm already costs more than two depth-0
steps: a first batch of 16 whose depth-1 rounds lose does not run every depth and tree twice.
Afterwards the gate probes
each other arm on its own schedule, one probe at a time, the most promising due arm first. An
arm's interval starts at ``probe_every`` rounds of the bucket; a probe that leaves the choice
unchanged (and the first measurement of the arm) multiplies it by 2 when the arm's rate is within
10% of the chosen one's, by 4 within 25% and by 8 otherwise, up to ``max_probe_every`` (4x that for arms more than 10% behind, 16x for arms
more than 25% behind): a settled bucket spends little on probes, and least on the arms that cost
the most to try. The arms more than 10% behind are moreover probed no more often than keeps what
their probes lose within ``probe_budget`` (2%) of the bucket's throughput together, by their
estimated step time and rate: at batch 16 a deep tree round that costs 7 plain steps and yields a
third of their rate is tried about once in 1,200 rounds. An arm that starts from an estimate (a
table, another bucket) is measured over one probe's rounds, not ``min_observations``. A probe that changes
the choice sets the intervals of the arms within 10% of the new choice back to ``probe_every``, so
a change (a calmer batch, an easier text) is still followed, and leaves the others' (far-behind
arms are not tried again each time two close arms swap; their tokens follow the shared per-depth
acceptance in any case). A step that caught up on many skipped rounds at once is not counted for
its arm.

A gate-cost table (``radar-vllm calibrate-gate``, :func:`save_gate_table`) keeps what a gate
measured on this machine at each batch size; an engine given one (``radar.gate_costs``) starts
every bucket the table covers from it (:meth:`DraftGate.seed`): no arm is measured from scratch,
the choice is the table's, its first measurement rescales the other arms' times (a busier or
faster machine), and probes are scheduled from the table's rates as if each arm had been probed
twice, except depth 0 where the choice drafts and depth 0 is within 25% of it: depth 0 is then
measured within ``probe_every`` rounds (a table measured at batch 4 with depth-1 steps of 49 ms
held an engine whose depth-1 steps took 57 ms on depth 1 for 255 rounds, 6% slower than not
drafting: rescaling depth 0 by depth 1's measurements kept the table's ratio). The table is a starting point, not a decision: the gate keeps measuring and follows the
measurements.

Which cap a round used does not change any output: verification is lossless whatever was drafted,
and the drafter catches up on skipped tokens before it drafts again
(:mod:`radar_vllm.vllm.catch_up`). No vLLM import.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from radar_vllm.core.costs import files_sha256, machine_key

logger = logging.getLogger(__name__)

GATE_TABLE_FORMAT = "radar-gate-costs/1"
# How tree-mode tables measured before tables named their tree verification verified trees: one
# node per request per kernel call in the requests' own slots, 128-token KV blocks.
LEGACY_TREE_VERIFY = "path-128"


def batch_bucket(batch_size: int) -> int:
    """Buckets 1, 2, 3-4, 5-8, ... (index = ceil(log2(batch_size)))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (batch_size - 1).bit_length()


def default_arms(max_depth: int) -> list[int]:
    """The depth caps a gate chooses among by default: 0 to 4 and ``max_depth``."""
    return sorted({0, 1, *(min(cap, max_depth) for cap in (2, 3, 4)), max_depth})


def policy_arms(max_depth: int, tree_sizes: Sequence[int] = ()) -> list[int]:
    """The arms whose rounds the stop policy shapes (the deepest; the others draft fixed-depth
    chains): their tokens are their own average (``own_arms``), not the shared per-depth acceptance.
    With ``tree_sizes`` (smaller trees a tree engine may verify), one more arm per size:
    ``max_depth + 1 + i`` grows a policy tree like the deepest arm's and verifies its best
    ``tree_sizes[i]`` tokens (root included); see :func:`round_shape`."""
    return [max_depth, *(max_depth + 1 + index for index in range(len(tree_sizes)))]


def gate_arms(max_depth: int, tree_sizes: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """An engine's gate arms and the policy's among them: :func:`default_arms` plus one arm per smaller tree size."""
    own = policy_arms(max_depth, tree_sizes)
    return sorted({*default_arms(max_depth), *own}), own


def round_shape(arm: int, max_depth: int, tree_sizes: Sequence[int] = ()) -> tuple[int, int | None]:
    """``(depth cap, tree size)`` of a gate arm: a cap up to ``max_depth`` is itself, with the
    engine's own tree size (None); an arm above it is a full-depth policy round verifying a
    smaller tree (:func:`policy_arms`)."""
    if arm <= max_depth:
        return arm, None
    index = arm - max_depth - 1
    if index >= len(tree_sizes):
        raise ValueError(f"gate arm {arm} is above max_depth={max_depth} and the engine has {len(tree_sizes)} "
                         f"smaller tree size(s)")
    return max_depth, int(tree_sizes[index])


@dataclass(kw_only=True)
class RunningMean:
    """What an estimate's moving averages share: a running mean over the first ``1 / smoothing``
    observations of its window, a moving average after; :meth:`refresh` shortens the window."""

    count: int = 0  # observations in this bucket
    seeded: bool = False  # the estimate comes from elsewhere (a table, another bucket; count is 0)
    window: int = 0  # observations the running mean spans

    @property
    def known(self) -> bool:
        return self.count > 0 or self.seeded

    def _weight(self, smoothing: float) -> float:
        """Count one observation; the weight it gets."""
        self.count += 1
        self.window += 1
        self.seeded = False
        return max(smoothing, 1.0 / self.window)

    def refresh(self, prior: int) -> None:
        """Restart the running mean with the current estimate worth ``prior`` observations."""
        self.window = min(self.window, prior)


@dataclass
class ArmEstimate(RunningMean):
    """Moving averages for one arm of one bucket (an observation: a step)."""

    seconds: float = 0.0  # wall seconds per step
    tokens: float = 0.0  # tokens emitted per request per step (its own steps)
    seed_seconds: float = 0.0  # the seconds it was seeded with (0: not seeded)

    def update(self, seconds: float, tokens: float, smoothing: float) -> None:
        weight = self._weight(smoothing)
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens - self.tokens)


@dataclass
class DepthAcceptance:
    """How often draft ``depth`` is accepted among the requests that drafted it with every earlier
    draft accepted (a conditional rate), as discounted counts over the rounds that drafted it."""

    hits: float = 0.0  # such requests whose draft at this depth was accepted
    trials: float = 0.0  # such requests
    count: int = 0  # rounds that observed this depth here
    seeded: bool = False  # the counts come from elsewhere (a table, another bucket)

    @property
    def known(self) -> bool:
        return self.count > 0 or self.seeded

    def update(self, hits: int, trials: int, discount: float) -> None:
        """One round: the old counts discounted by ``discount``, this round's added."""
        self.hits = self.hits * (1.0 - discount) + hits
        self.trials = self.trials * (1.0 - discount) + trials
        self.count += 1
        self.seeded = False

    def limit(self, trials: float) -> None:
        """Keep the current rate, worth at most ``trials`` requests (before a probe: what it sees
        then moves the estimate about halfway)."""
        if self.trials > trials:
            self.hits *= trials / self.trials
            self.trials = trials

    @classmethod
    def from_rate(cls, rate: float, trials: float) -> "DepthAcceptance":
        """A seeded estimate: ``rate`` worth ``trials`` requests."""
        rate = min(1.0, max(0.0, rate))
        return cls(hits=rate * trials, trials=trials, seeded=True)


def depth_reach(acceptance: Sequence[DepthAcceptance], prior_trials: float) -> list[float | None]:
    """How often a request gets at least j drafts accepted (index j - 1), from the conditional
    rates: the product of depths 1..j, None from the first depth never seen. Depth 1 is every
    drafting round's and is its own count; a deeper depth is seen only in the rounds whose first
    drafts were accepted (at batch 1 depth 3 in about one round of six), so its rate is drawn
    towards the depth above's by ``prior_trials`` requests' worth: a few probe rounds that met no
    accepted third draft do not make depth 3 look worthless (the shallower depths' estimates, from
    every round, carry the rest of the product)."""
    out: list[float | None] = []
    reach, above = 1.0, None
    for depth in acceptance:
        if not depth.known:
            out += [None] * (len(acceptance) - len(out))
            break
        if above is None:
            rate = depth.hits / depth.trials if depth.trials > 0 else 0.0
        else:
            rate = (depth.hits + prior_trials * above) / (depth.trials + prior_trials)
        reach *= rate
        above = rate
        out.append(reach)
    return out


@dataclass
class BucketState:
    arms: dict[int, ArmEstimate]
    reach: list[DepthAcceptance]  # index j - 1: draft j accepted, drafts 1..j - 1 being accepted
    intervals: dict[int, int]  # per arm: rounds of this bucket between its probes
    waits: dict[int, int] = field(default_factory=dict)  # per arm: rounds since it last ran
    settled: bool = False  # every arm measured (or seeded) and the probe intervals set from their rates
    from_table: bool = False  # seeded from a gate-cost table (its rates schedule the first probes)
    probing: int | None = None  # the arm a probe is measuring (its last observation ends the probe)
    probe_left: int = 0  # rounds of the probe still to run after the current one
    chosen_before_probe: int | None = None
    margin: float = 0.0  # how much a drafting arm must beat depth 0 by to be chosen (0 at batch 1)
    announced: int | None = None  # the choice last logged
    announced_at: float = 0.0  # when (time.monotonic())
    probe_rounds: int = 1  # rounds one measurement of an arm lasts in this bucket


class DraftGate:
    """Chooses a depth cap per engine step (see the module docstring)."""

    LOG_EVERY_S = 60.0  # a bucket's changed choice is logged at most this often

    def __init__(self, max_depth: int, arms: Sequence[int] | None = None, probe_every: int = 16,
                 max_probe_every: int = 256, min_observations: int = 2, smoothing: float = 0.15,
                 probe_requests: int = 8, own_arms: Sequence[int] = (), draft_margin: float = 0.1,
                 probe_budget: float = 0.02, tree_sizes: Sequence[int] = (), depth_prior: float = 4.0) -> None:
        """``own_arms``: caps whose rounds draft otherwise than a fixed-depth chain cut short (an
        engine's deepest arm: the stop policy's chains or trees, :func:`policy_arms`): their tokens
        are their own measured average, and their rounds feed the shared per-depth acceptance only
        where :meth:`observe` is told what each request drafted (chains a stop policy cut short).
        ``draft_margin``: in batches of more than one request, the fraction by which a drafting
        arm's rate must beat depth 0's for the gate to choose it. ``probe_budget``: the share of a
        settled bucket's throughput the probes of the arms more than 10% behind may cost together.
        ``tree_sizes``: the smaller trees of the policy arms above ``max_depth`` (:func:`policy_arms`;
        recorded in tables, which must agree). ``depth_prior``: how many requests' worth a depth's
        acceptance is drawn towards the depth above's (:func:`depth_reach`)."""
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        caps = sorted(set(arms if arms is not None else default_arms(max_depth)))
        own = frozenset(int(cap) for cap in own_arms)
        above = [cap for cap in caps if cap > max_depth and cap not in own]
        if len(caps) < 2 or caps[0] < 0 or above:
            raise ValueError(f"arms must hold at least two depth caps in [0, {max_depth}] (policy arms, own_arms, "
                             f"may lie above it: smaller trees), got {list(caps)}")
        if not 2 <= probe_every <= max_probe_every:
            raise ValueError(f"need 2 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        if min_observations < 1:
            raise ValueError(f"min_observations must be >= 1, got {min_observations}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if probe_requests < 1:
            raise ValueError(f"probe_requests must be >= 1, got {probe_requests}")
        if not 0.0 <= draft_margin < 1.0:
            raise ValueError(f"draft_margin must be in [0, 1), got {draft_margin}")
        if not 0.0 < probe_budget <= 1.0:
            raise ValueError(f"probe_budget must be in (0, 1], got {probe_budget}")
        if depth_prior < 0.0:
            raise ValueError(f"depth_prior must be >= 0, got {depth_prior}")
        self.depth_prior = depth_prior
        self.probe_budget = probe_budget
        self.tree_sizes = [int(size) for size in tree_sizes]
        self.draft_margin = draft_margin
        self.probe_requests = probe_requests
        self.own_arms = own
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
            reach = [DepthAcceptance() for _ in range(self.max_depth)]
            known = [other for other, state in self.buckets.items() if any(a.known for a in state.arms.values())]
            if known:  # step costs from the nearest: same size first (then the same kind), then smaller
                nearest_key = min(known, key=lambda other: (abs(other[1] - key[1]), other[0] != sampling, other[1]))
                # acceptance from the nearest of the same kind (sampling accepts fewer drafts), if any
                same_kind = [other for other in known if other[0] == sampling]
                accepting = self.buckets[min(same_kind, key=lambda other: (abs(other[1] - key[1]), other[1]))
                                         if same_kind else nearest_key]
                for cap, seconds, tokens in self._scaled_seeds(self.buckets[nearest_key], key[1] - nearest_key[1]):
                    if accepting.arms[cap].known:
                        tokens = accepting.arms[cap].tokens
                    arms[cap] = ArmEstimate(seconds, tokens, seeded=True, seed_seconds=seconds)
                reach = [DepthAcceptance(depth.hits, depth.trials, seeded=True) if depth.known
                         else DepthAcceptance() for depth in accepting.reach]
                for depth in range(1, self.max_depth + 1):  # worth one probe here
                    reach[depth - 1].limit(self._probe_trials(accepting, depth))
            self.buckets[key] = self._new_state(key[1], arms, reach)
        return self.buckets[key]

    def _new_state(self, index: int, arms: dict[int, ArmEstimate], reach: list[DepthAcceptance],
                   from_table: bool = False) -> BucketState:
        """A bucket's state: every arm's probe interval at ``probe_every``, its margin and probe
        length from its index."""
        return BucketState(arms, reach, {cap: self.probe_every for cap in self.caps}, {cap: 0 for cap in self.caps},
                           from_table=from_table, margin=self._margin(index),
                           probe_rounds=self.probe_rounds(1 << index))

    def _scaled_seeds(self, source: BucketState, doublings: int) -> list[tuple[int, float, float]]:
        """``(cap, seconds, tokens)`` of ``source``'s known arms for a bucket ``doublings`` batch-size
        doublings away: what a drafting arm costs beyond depth 0 grows with the rows it drafts and
        verifies, so that extra is scaled by the batch-size ratio (2 ** doublings); tokens per
        request do not depend on the load."""
        base = source.arms[0].seconds if 0 in source.arms and source.arms[0].known else 0.0
        seeds = []
        for cap, arm in source.arms.items():
            if not arm.known:
                continue
            seconds = arm.seconds
            if base > 0 and cap > 0 and doublings:
                seconds = base * max(1.0, 1.0 + (arm.seconds / base - 1.0) * 2.0 ** doublings)
            seeds.append((cap, seconds, arm.tokens))
        return seeds

    def _margin(self, index: int) -> float:
        """The draft margin of bucket ``index`` (none for batch 1: a lone request does not drain)."""
        return self.draft_margin if index > 0 else 0.0

    def _reach(self, state: BucketState) -> list[float | None]:
        """How often a request of this bucket gets at least j drafts accepted (index j - 1; None:
        not seen)."""
        return depth_reach(state.reach, self.depth_prior)

    def _probe_worth(self, above: float) -> float:
        """The requests a probe of ``probe_requests`` request-rounds is expected to show a depth to
        when ``above`` of them get every earlier draft accepted, at least 1."""
        return max(1.0, self.probe_requests * above)

    def _probe_trials(self, state: BucketState, depth: int) -> float:
        """:meth:`_probe_worth` of depth ``depth`` from this bucket's estimates."""
        above = self._reach(state)[depth - 2] if depth > 1 else 1.0
        return self._probe_worth(above or 0.0)

    def _tokens(self, state: BucketState, cap: int) -> float:
        """Tokens per request per step under ``cap``: from the per-depth acceptance when every depth
        up to the cap has been seen (and the cap is not one of ``own_arms``), else the arm's own
        average."""
        reach = self._reach(state)[:cap]
        if cap > 0 and cap not in self.own_arms and all(rate is not None for rate in reach):
            return 1.0 + sum(reach)
        return state.arms[cap].tokens

    def _rate(self, state: BucketState, cap: int) -> float:
        """Tokens per request per second under ``cap``."""
        seconds = state.arms[cap].seconds
        return self._tokens(state, cap) / seconds if seconds > 0 else 0.0

    def _score(self, state: BucketState, cap: int) -> float:
        """The rate the choice compares: a drafting arm's divided by 1 + the bucket's margin."""
        return self._rate(state, cap) / ((1.0 + state.margin) if cap > 0 else 1.0)

    def _seed_from_shallower(self, state: BucketState, cap: int, batched: bool) -> bool:
        """Estimate an unknown arm instead of measuring it when a shallower drafting arm known here
        (measured or estimated) loses to depth 0 and either the batch holds more than one request
        (``batched``) or that arm costs more than two depth-0 steps. The deeper arm's extra cost
        over a depth-0 step is taken to grow in proportion to its depth, and every further depth to be accepted as
        often as the shallower arm's last: an estimate that loses to depth 0 as well (probes measure
        it later, on the budget). In a batch, drafting's extra cost grows with every level (each
        drafts and verifies a row per request): a first batch of 16 whose depth-1 rounds lose does
        not spend its first rounds on the deeper arms. A lone request's step on a CPU can cost less
        deeper (the target's matrix products are faster on 4-6 rows than on 2), so at batch 1 only
        an arm that is already dear stops the sweep."""
        base = state.arms.get(0)
        if base is None or not base.known or base.seconds <= 0 or cap > self.max_depth:
            return False  # (an arm above max_depth is a smaller tree, not a deeper chain: measured)
        for shallower in reversed([c for c in self.caps if 0 < c < cap]):
            arm = state.arms[shallower]
            if not arm.known:
                continue
            dear = arm.seconds > 2.0 * base.seconds
            if not (dear or batched) or self._score(state, shallower) >= self._score(state, 0):
                return False
            last = self._reach(state)[shallower - 1] or 0.0
            tokens = self._tokens(state, shallower) + (cap - shallower) * last
            seconds = base.seconds + max(0.0, arm.seconds - base.seconds) * cap / shallower
            state.arms[cap] = ArmEstimate(seconds, tokens, seeded=True, seed_seconds=seconds)
            return True
        return False

    def preferred(self, batch_size: int, sampling: bool = False) -> int:
        """The arm with the highest score (:meth:`_score`; no exploration; ties go to the shallower cap)."""
        state = self._bucket(batch_size, sampling)
        return max(self.caps, key=lambda cap: (self._score(state, cap), -cap))

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
            # (an arm that started from an estimate, seed_seconds > 0, is measured by its probes)
            if arm.seed_seconds == 0 and arm.count < needed:
                if arm.count == 0 and self._seed_from_shallower(state, cap, batched=batch_size > 1):
                    continue
                return cap
        if state.probing is not None and state.probe_left > 0:
            state.probe_left -= 1
            return state.probing
        choice = self.preferred(batch_size, sampling)
        if choice != state.announced and (state.announced is None
                                          or time.monotonic() - state.announced_at >= self.LOG_EVERY_S):
            self._announce(state, batch_size, sampling, choice)
        if not state.settled:  # an arm's first measurement here counts as its first probe, a
            state.settled = True  # table's as two, a neighbour's estimate of a dear arm as one
            chosen_seconds = state.arms[choice].seconds
            for cap in self.caps:
                arm = state.arms[cap]
                dear = arm.seeded and arm.seconds > 2.0 * chosen_seconds  # a round costs > 2 chosen ones
                if cap != choice and (arm.count > 0 or dear or state.from_table):
                    self._reschedule(state, choice, cap, confirmations=2 if state.from_table else 1)
                elif cap != choice:
                    state.intervals[cap] = max(state.intervals[cap], self._budget_interval(state, choice, cap))
            if choice > 0 and 0 in state.arms and state.arms[0].count == 0 and self._ratio(state, choice, 0) >= 0.75:
                # depth 0 only estimated here, within 25% of a drafting choice: measured soon (a
                # table's drafting costs may flatter this engine, and rescaling depth 0 by the
                # chosen arm's measurements keeps the table's ratio)
                state.intervals[0] = self.probe_every
        due = []
        for cap in self.caps:
            state.waits[cap] = 0 if cap == choice else state.waits[cap] + 1
            if cap != choice and state.waits[cap] >= state.intervals[cap]:
                due.append(cap)
        if due:  # (a probe never observed is replaced by the next one due)
            cap = max(due, key=lambda other: (self._score(state, other), -other))
            state.waits[cap] = 0
            state.probing = cap
            state.probe_left = self.probe_rounds(batch_size) - 1
            state.chosen_before_probe = choice
            self._refresh_probed(state, choice, cap)
            return cap
        return choice

    def _refresh_probed(self, state: BucketState, choice: int, cap: int) -> None:
        """Before a probe of ``cap``: what only probes measure (the arm's step time and tokens, and
        the acceptance of the depths the chosen arm does not draft) restarts its running mean with
        the current estimate worth one probe, so that each probe moves it halfway to what the probe
        sees. A moving average weighs a probe's rounds a few percent (at batch 1 eight rounds make
        14%), and one unlucky early probe would hold an arm back for hundreds of rounds."""
        prior = state.probe_rounds
        state.arms[cap].refresh(prior)
        if cap in self.own_arms:
            return
        shared = choice if choice not in self.own_arms else 0  # depths the chosen arm's rounds measure
        for depth in range(shared + 1, cap + 1):
            state.reach[depth - 1].limit(self._probe_trials(state, depth))

    def observe(self, batch_size: int, cap: int, seconds: float, tokens: float | Sequence[int],
                typical: bool = True, sampling: bool = False, drafted: Sequence[int] | None = None) -> None:
        """One measured step: ``seconds`` from the round's decision to the next one, and the tokens
        the step emitted: per request (a sequence; then every depth up to the cap learns how often
        it is reached), or their mean per request (1 when it verified nothing). ``typical=False``:
        the step did extra work that says nothing about its arm (the drafter catching up on many
        skipped rounds at once); it is not counted, and a probe that ends on it runs one round longer.
        ``drafted``: for a round of one of ``own_arms`` whose drafts are the fixed-depth chains cut
        where a stop policy stopped (RADAR's chain mode), the drafts each request had verified; the
        per-depth acceptance then learns from it too (:meth:`_learn_depths`)."""
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
        # a step of a small batch is a small sample (at batch 1 it yields 1 or 2 tokens): average
        # over about as many request-steps in every bucket
        smoothing = self.smoothing * min(1.0, batch_size / self.probe_requests)
        arm.update(seconds, mean_tokens, smoothing)
        if arm.seed_seconds > 0:  # carry the seeds' ratios to the arms still seeded: they follow
            factor = arm.seconds / arm.seed_seconds  # this arm's running mean, not one step
            for other in state.arms.values():
                if other is not arm and other.seeded and other.seed_seconds > 0:
                    other.seconds = other.seed_seconds * factor
        if per_request and cap not in self.own_arms:  # a fixed-depth chain drafted the cap for every request
            drafted = [cap] * len(per_request)
        if per_request and drafted is not None and len(drafted) == len(per_request):
            self._learn_depths(state, per_request, [int(d) for d in drafted], smoothing)
        if state.probing == cap and state.probe_left == 0:
            self._end_probe(state, batch_size, sampling, cap)

    @staticmethod
    def _learn_depths(state: BucketState, emitted: list[int], drafted: list[int], discount: float) -> None:
        """The per-depth acceptance from a chain round (request i verified ``drafted[i]`` drafts of
        the fixed-depth chain and emitted ``emitted[i]`` tokens): depth j learns from the requests
        that drafted it with every earlier draft accepted. A fixed cap drafted it for every request;
        RADAR's chain rounds are the fixed chains cut where the stop policy stopped, so they teach
        the same rates, and a request stopped with all its drafts accepted says nothing about the
        depths it did not draft (counting it as a miss would make every cap look worse than it is).
        Without the policy's rounds a gate that settled on the policy's arm judged every fixed depth
        by its last probes alone: at batch 1, probes that met text accepting little kept RADAR's
        chains on the policy's rounds (60 ms a step) where a depth-3 chain (50 ms) emitted as many
        tokens per step."""
        for depth in range(1, len(state.reach) + 1):
            # emitted >= depth: the first depth - 1 drafts were accepted
            at_risk = [t > depth for t, d in zip(emitted, drafted) if d >= depth and t >= depth]
            if not at_risk:
                break
            state.reach[depth - 1].update(sum(at_risk), len(at_risk), discount)

    def _announce(self, state: BucketState, batch_size: int, sampling: bool, choice: int) -> None:
        """Log a bucket's first choice, and later a changed one at most once per ``LOG_EVERY_S``
        (at batch 1 close arms swap often), with every arm's rate (INFO)."""
        rates = ", ".join(f"{cap}: {self._rate(state, cap):.1f}{'' if state.arms[cap].count else '?'}"
                          for cap in self.caps)
        largest = 1 << batch_bucket(batch_size)
        sizes = f"{largest // 2 + 1}-{largest}" if largest > 2 else str(largest)
        logger.info("depth gate: batches of %s%s requests draft to depth %d%s; tokens/s per request by depth cap "
                    "(? = estimated, not measured here): %s", sizes, " (some sampling)" if sampling else "", choice,
                    "" if state.announced is None else f" (was {state.announced})", rates)
        state.announced, state.announced_at = choice, time.monotonic()

    def _end_probe(self, state: BucketState, batch_size: int, sampling: bool, cap: int) -> None:
        """Reschedule the probed arm: later the further it is behind. A probe that changed the
        choice restarts the schedules of the arms within 10% of the new choice; the others keep
        theirs (an arm far behind is not tried again just because two close arms swapped: its
        tokens follow the shared per-depth acceptance anyway, and its step time changes little)."""
        state.probing = None
        choice = self.preferred(batch_size, sampling)
        if choice != state.chosen_before_probe:
            for other in self.caps:
                if self._ratio(state, choice, other) >= 0.9:
                    state.intervals[other] = self.probe_every
        else:
            self._reschedule(state, choice, cap)

    def _ratio(self, state: BucketState, choice: int, cap: int) -> float:
        """An arm's score relative to the chosen arm's."""
        best = self._score(state, choice)
        return self._score(state, cap) / best if best > 0 else 1.0

    def _reschedule(self, state: BucketState, choice: int, cap: int, confirmations: int = 1) -> None:
        """Lengthen an arm's probe interval by x2 / x4 / x8 per confirmation for an arm within 10% /
        25% / further behind the choice, up to 1x / 4x / 16x ``max_probe_every``."""
        ratio = self._ratio(state, choice, cap)
        factor, ceiling = (2, 1) if ratio >= 0.9 else (4, 4) if ratio >= 0.75 else (8, 16)
        interval = min(state.intervals[cap] * factor ** confirmations, self.max_probe_every * ceiling)
        state.intervals[cap] = max(interval, self._budget_interval(state, choice, cap))

    def _budget_interval(self, state: BucketState, choice: int, cap: int) -> int:
        """The shortest probe interval that keeps the throughput an arm more than 10% behind loses
        to its probes within its share of ``probe_budget`` (split among the arms other than the
        chosen one): a probe of ``probe_rounds`` rounds, each costing
        ``seconds(cap) / seconds(choice)`` chosen rounds and yielding ``1 - ratio`` less per second,
        per interval of chosen rounds (at batch 64 a deep tree round costs about 16 plain steps:
        it is tried once in a few thousand rounds, not every hundred). 0 for closer arms."""
        ratio = self._ratio(state, choice, cap)
        chosen_seconds = state.arms[choice].seconds
        if ratio >= 0.9 or chosen_seconds <= 0:
            return 0
        cost = state.probe_rounds * state.arms[cap].seconds / chosen_seconds * (1.0 - max(0.0, ratio))
        share = self.probe_budget / max(1, len(self.caps) - 1)  # the budget is shared by the other arms
        return min(int(cost / share) + 1, self.max_probe_every * 16)

    def export(self) -> dict[str, Any]:
        """What this gate measured, per bucket it ran: the arms it measured, and those it only
        estimated (``steps`` 0: from a table, another bucket or a shallower arm), for a table."""
        buckets: dict[str, Any] = {}
        for (sampling, index), state in sorted(self.buckets.items()):
            arms = {str(cap): {"seconds": arm.seconds, "tokens": arm.tokens, "steps": arm.count}
                    for cap, arm in state.arms.items() if arm.count > 0 or arm.seed_seconds > 0}
            if any(arm["steps"] > 0 for arm in arms.values()):
                reach = self._reach(state)  # (how often at least j drafts are accepted)
                buckets[f"{1 << index}{'s' if sampling else ''}"] = {
                    "arms": arms, "reach": [rate if depth.count > 0 else None
                                            for rate, depth in zip(reach, state.reach)]}
        table = {"arms": list(self.caps), "own_arms": sorted(self.own_arms), "max_depth": self.max_depth,
                 "buckets": buckets}
        if self.tree_sizes:
            table["tree_sizes"] = list(self.tree_sizes)
        return table

    def seed(self, table: Mapping[str, Any]) -> None:
        """Start the buckets a table (:meth:`export`'s shape) covers from its estimates."""
        own = table.get("own_arms")  # (tables without: every drafting cap ran the stop policy)
        if not _covers(self.caps, self.own_arms, self.tree_sizes, self.max_depth, table):
            raise ValueError(f"the gate-cost table has arms {list(table['arms'])} (max depth {table['max_depth']}, "
                             f"own arms {own}, smaller trees {table.get('tree_sizes', [])}), this gate {self.caps} "
                             f"(max depth {self.max_depth}, own arms {sorted(self.own_arms)}, smaller trees "
                             f"{self.tree_sizes})")
        for name, entry in table["buckets"].items():
            sampling = name.endswith("s")
            key = (sampling, batch_bucket(int(name.rstrip("s"))))
            arms = {cap: ArmEstimate() for cap in self.caps}
            for cap, arm in entry["arms"].items():
                if float(arm["seconds"]) > 0:
                    arms[int(cap)] = ArmEstimate(float(arm["seconds"]), float(arm["tokens"]), seeded=True,
                                                 seed_seconds=float(arm["seconds"]))
            reach, above = [], 1.0  # a depth's acceptance given the depth above's, worth one probe
            for rate in list(entry["reach"])[: self.max_depth]:
                if rate is None:
                    break
                reach.append(DepthAcceptance.from_rate(float(rate) / above if above > 0 else 0.0,
                                                       self._probe_worth(above)))
                above = float(rate)
            reach += [DepthAcceptance() for _ in range(self.max_depth - len(reach))]
            self.buckets[key] = self._new_state(key[1], arms, reach, from_table=True)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per bucket (largest batch size in it, ``"s"`` appended for batches that sample): every
        arm's rate, tokens, step count and probe interval, and how often each depth is accepted
        (for logs and tests)."""
        out: dict[str, dict[str, float]] = {}
        for (sampling, index), state in sorted(self.buckets.items()):
            entry: dict[str, float] = {}
            for cap, arm in state.arms.items():
                entry[f"probe_interval_d{cap}"] = state.intervals[cap]
                entry[f"rate_d{cap}"] = self._rate(state, cap)
                entry[f"tokens_d{cap}"] = self._tokens(state, cap)
                entry[f"steps_d{cap}"] = arm.count
            above = 1.0
            for depth, reach in enumerate(self._reach(state), start=1):
                if reach is None:
                    break
                entry[f"reach_{depth}"] = reach
                entry[f"accept_{depth}"] = reach / above if above > 0 else 0.0
                above = reach
            out[f"{1 << index}{'s' if sampling else ''}"] = entry
        return out


# --------------------------------------------------------------------------------------------
# gate-cost tables: a gate's estimates at every batch size, measured once on a machine


def weights_id(checkpoint_dir: str | Path) -> str:
    """``<folder>@<12 hex>``: sha256 of a head folder's top-level ``*.safetensors`` files (not its
    config.json, which names the table)."""
    folder = Path(checkpoint_dir)
    return f"{folder.resolve().name}@{files_sha256(sorted(folder.glob('*.safetensors')))[:12]}"


def save_gate_table(table: Mapping[str, Any], path: str | Path) -> Path:
    """Write a gate-cost table (JSON) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(dict(table), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def load_gate_table(path: str | Path) -> dict[str, Any]:
    """Read a gate-cost table; a missing file or another format raises ValueError naming it."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"radar.gate_costs: cannot read the gate-cost table {path}: {error}") from error
    if not isinstance(table, dict) or table.get("format") != GATE_TABLE_FORMAT:
        raise ValueError(f"radar.gate_costs: {path} is not a gate-cost table (format {GATE_TABLE_FORMAT!r}); "
                         f"write one with `radar-vllm calibrate-gate`")
    return table


def _covers(caps: Sequence[int], own_arms: Sequence[int], tree_sizes: Sequence[int], max_depth: int,
            section: Mapping[str, Any]) -> bool:
    """Whether a table section's arms fit an engine's: the same depth caps and policy arms, and the
    same smaller trees or the first of the engine's (an engine with more smaller trees than its
    table measures their arms itself)."""
    table_caps, table_own = set(section.get("arms", ())), section.get("own_arms")
    table_sizes = [int(size) for size in section.get("tree_sizes", ())]
    return (table_own is not None and int(section.get("max_depth", -1)) == max_depth
            and list(tree_sizes[: len(table_sizes)]) == table_sizes and table_caps <= set(caps)
            and {cap for cap in caps if cap <= max_depth} <= table_caps
            and sorted(table_own) == sorted(set(own_arms) & table_caps))


def gate_table_problems(table: Mapping[str, Any], *, checkpoint_id: str, mode: str, dtype: str, target: str,
                        caps: Sequence[int], max_depth: int, machine: tuple[Any, ...],
                        verify: str | None = None, own_arms: Sequence[int] = (),
                        tree_sizes: Sequence[int] = ()) -> list[str]:
    """What makes ``table`` describe another engine than this one (empty: it fits). ``verify``:
    how this engine verifies trees (tree mode; its step costs depend on it), e.g. ``"scratch-32"``;
    a tree section that names none was measured with ``LEGACY_TREE_VERIFY``."""
    expected = {"checkpoint_id": checkpoint_id, "dtype": dtype, "target": target}
    problems = [f"{key}={table.get(key)!r} (this engine: {value!r})" for key, value in expected.items()
                if table.get(key) != value]
    table_machine = machine_key(table.get("machine") or {})
    if table_machine != tuple(machine):
        problems.append(f"machine {list(table_machine)} (this one: {list(machine)})")
    section = (table.get("modes") or {}).get(mode)
    if section is None:
        problems.append(f"no {mode!r} mode (it has {sorted(table.get('modes') or {})})")
    elif section.get("own_arms") is None:
        problems.append("every drafting cap running the stop policy (this engine's caps below the deepest "
                        "draft fixed-depth chains)")
    elif not _covers(caps, own_arms, tree_sizes, max_depth, section):
        problems.append(f"arms {section.get('arms')}, policy arms {section['own_arms']}, smaller trees "
                        f"{section.get('tree_sizes', [])} (this engine: {list(caps)}, {list(own_arms)}, "
                        f"{list(tree_sizes)})")
    elif verify is not None and section.get("verify", LEGACY_TREE_VERIFY) != verify:
        problems.append(f"tree verification {section.get('verify', LEGACY_TREE_VERIFY)!r} (this engine: {verify!r})")
    return problems


def check_gate_tables(tables: Sequence[tuple[str | Path, Mapping[str, Any]]], *, strict: bool, checkpoint_id: str,
                      mode: str, dtype: str, target: str, caps: Sequence[int], max_depth: int, max_batch_size: int,
                      machine: tuple[Any, ...], verify: str | None = None,
                      own_arms: Sequence[int] = (), tree_sizes: Sequence[int] = (),
                      extrapolate: bool = False) -> dict[str, Any] | None:
    """The part of the first of ``tables`` (``(path, table)`` pairs, e.g. one per machine) that fits
    this engine that its gate starts from: ``{"arms", "own_arms", "max_depth", "buckets"}`` of its mode
    (and ``"tree_sizes"`` where the table has smaller trees), or None.

    A table measured for another head, dtype, target, machine, tree verification (``verify``), or
    without this mode, set of depth caps and policy arms (``own_arms``), describes another engine.
    When none fits, tables the user named (``strict``) are refused (ValueError saying what differs in each and how to measure
    this one); the checkpoint's
    own, which a user did not choose, are then only not used (a warning): the gate measures from
    scratch, as without a table. A table the user named whose batch sizes stop short of the
    engine's largest (``max_batch_size``, vLLM's ``max_num_seqs``) describes another engine too,
    unless the user asked for it (``extrapolate``, ``radar.gate_costs_extrapolate``): it is then
    used, its largest batch size carried to the larger ones (each starts from the nearest bucket
    measured, drafting's extra cost scaled to the batch size, and measures itself), with a
    warning. The checkpoint's own tables are used so, with a warning, whatever the engine's
    largest batch (an engine started with vLLM's CPU defaults, 256 sequences offline and 128
    served, must not fail because the shipped tables stop at 64)."""
    remeasure = (f"measure this engine with `radar-vllm calibrate-gate --checkpoint DIR --mode {mode} --dtype {dtype} "
                 f"--max-batch-size {max_batch_size} --out FILE` and name FILE in radar.gate_costs (a file or a list "
                 f"of files, one per machine), or leave radar.gate_costs out")
    found: list[str] = []
    for path, table in tables:
        problems = gate_table_problems(table, checkpoint_id=checkpoint_id, mode=mode, dtype=dtype, target=target,
                                       caps=caps, max_depth=max_depth, machine=machine, verify=verify,
                                       own_arms=own_arms, tree_sizes=tree_sizes)
        if problems:
            found.append(f"{path} was measured with " + "; ".join(problems))
            continue
        section = table["modes"][mode]
        sizes = [int(name.rstrip("s")) for name in section.get("buckets", {})]
        if not sizes or batch_bucket(max(sizes)) < batch_bucket(max_batch_size):
            largest = max(sizes) if sizes else None
            if strict and not extrapolate:
                found.append(f"{path} covers batch sizes up to {largest} and this engine runs up to {max_batch_size} "
                             f"(max_num_seqs; set radar.gate_costs_extrapolate to true to start the larger batches "
                             f"from the largest it covers)")
                continue
            logger.warning("radar.gate_costs: %s covers batch sizes up to %s, this engine runs up to %d: larger "
                           "batches start from the largest it covers and measure themselves; %s", path, largest,
                           max_batch_size, remeasure)
        return {key: section[key] for key in ("arms", "own_arms", "max_depth", "buckets", "tree_sizes")
                if key in section}
    message = "radar.gate_costs: no table fits this engine: " + "; ".join(found) + f"; {remeasure}"
    if strict:
        raise ValueError(message)
    logger.warning("%s (the depth gate measures from scratch)", message)
    return None
