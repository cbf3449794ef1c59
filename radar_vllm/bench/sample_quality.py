"""Are sampled outputs distributed like no speculation's? A cheap statistic and its test.

Speculative decoding must leave the output distribution unchanged. A broken verification step
(wrong temperature, wrong top-p, ...) shows in the text long before it shows in a speed table, so
every sampled (T > 0) comparison carries this check:

- **statistic**: for one output, the mean over its generated tokens of
  ``log softmax(target_logits / T)[token]``: the target's log-probability per token at the
  sampling temperature (top-k / top-p are not applied, so a legitimate token never scores -inf).
  It is computed by the target model itself in float32 (transformers), independently of vLLM.
- **test**: with the same prompts and sampling settings, the per-output statistics of a
  speculative run and of no speculation have the same expectation. Welch's two-sample test on
  their means (Student t with Welch-Satterthwaite degrees of freedom, so that a handful of
  outputs is not over-trusted; for many outputs it is the z test); a row is *flagged* when the
  two-sided p-value is below ``alpha``, or below ``LARGE_SHIFT_ALPHA`` when the means differ by
  more than ``LARGE_SHIFT`` nats per token (a benchmark cell has few outputs, so a large shift
  alone is evidence enough; ``benchmarks/results/README.md`` has the measurements behind both).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_ALPHA = 1e-3
# a shift of the mean log-prob per token this large (nats) is flagged already at p < LARGE_SHIFT_ALPHA
LARGE_SHIFT = 1.0
LARGE_SHIFT_ALPHA = 0.05
_MAX_ITERATIONS = 10_000  # continued fraction of the incomplete beta function
_NORMAL_DF = 1e5  # above: the t distribution is the normal one


def load_scorer(target_dir: str | Path) -> Any:
    """The target as a float32 transformers model, in eval mode (CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), torch_dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def logprob_per_token(model: Any, prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                      temperature: float, batch_size: int = 16) -> list[float]:
    """Per output: mean ``log softmax(logits / temperature)`` of its generated tokens (NaN for an
    empty output). Runs on the model's device."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(output_ids)} outputs")
    device = next(model.parameters()).device
    scores = [float("nan")] * len(output_ids)
    todo = [i for i, output in enumerate(output_ids) if output]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        sequences = [list(prompt_ids[i]) + list(output_ids[i]) for i in chunk]
        width = max(len(seq) for seq in sequences)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for row, seq in enumerate(sequences):  # right padding: causal rows before it are unaffected
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [batch, width, hidden]
        for row, i in enumerate(chunk):
            first, count = len(prompt_ids[i]) - 1, len(output_ids[i])  # the row before a token predicts it
            logits = model.lm_head(hidden[row, first:first + count]).float() / temperature
            target = torch.tensor(list(output_ids[i]), device=device).unsqueeze(1)
            scores[i] = float(torch.log_softmax(logits, dim=-1).gather(1, target).mean())
    return scores


@dataclass(frozen=True)
class QualityComparison:
    """A speculative run's per-token log-probability against no speculation's, same prompts."""

    temperature: float
    baseline_mean: float
    candidate_mean: float
    difference: float  # candidate - baseline
    z: float  # Welch's statistic: difference / its standard error
    p_value: float
    alpha: float
    num_baseline: int
    num_candidate: int
    df: float = math.inf  # Welch-Satterthwaite degrees of freedom of the statistic

    @property
    def flagged(self) -> bool:
        """True when the outputs are not distributed like no speculation's: p below ``alpha``, or a
        shift of more than ``LARGE_SHIFT`` nats per token with p below ``LARGE_SHIFT_ALPHA``."""
        return self.p_value < self.alpha or (abs(self.difference) > LARGE_SHIFT and self.p_value < LARGE_SHIFT_ALPHA)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), flagged=self.flagged)


def _mean_and_variance(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n < 2:
        raise ValueError(f"need at least 2 scored outputs, got {n}")
    mean = sum(finite) / n
    variance = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return mean, variance, n


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, _MAX_ITERATIONS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return result


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def two_sided_p(statistic: float, df: float) -> float:
    """``P(|T| >= |statistic|)`` for Student's t with ``df`` degrees of freedom (normal above
    ``_NORMAL_DF``)."""
    if not math.isfinite(statistic):
        return 0.0
    if df > _NORMAL_DF:
        return math.erfc(abs(statistic) / math.sqrt(2.0))
    return regularized_beta(df / (df + statistic * statistic), df / 2.0, 0.5)


def compare_quality(baseline: Sequence[float], candidate: Sequence[float], temperature: float,
                    alpha: float = DEFAULT_ALPHA) -> QualityComparison:
    """Welch's two-sample test of the per-output statistics (two-sided). Non-finite values
    (empty outputs) are left out; ValueError with fewer than 2 on either side."""
    mean_a, var_a, n_a = _mean_and_variance(baseline)
    mean_b, var_b, n_b = _mean_and_variance(candidate)
    part_a, part_b = var_a / n_a, var_b / n_b
    se = math.sqrt(part_a + part_b)
    diff = mean_b - mean_a
    if se > 0:
        z = diff / se
        df = (part_a + part_b) ** 2 / (part_a ** 2 / (n_a - 1) + part_b ** 2 / (n_b - 1))
        p_value = two_sided_p(z, df)
    else:
        z, df = (0.0 if diff == 0 else math.copysign(math.inf, diff)), math.inf
        p_value = 1.0 if diff == 0 else 0.0
    return QualityComparison(temperature=temperature, baseline_mean=mean_a, candidate_mean=mean_b,
                             difference=diff, z=z, p_value=p_value, alpha=alpha, num_baseline=n_a,
                             num_candidate=n_b, df=df)
