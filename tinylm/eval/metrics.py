"""acc, acc_norm and their standard errors, as lm-evaluation-harness computes them.

Source: `ConfigurableTask.process_results` (lm_eval/api/task.py) for multiple_choice, and lm_eval/api/metrics.py:
- acc = [argmax of the choices' summed log-likelihoods == gold]; ties go to the first choice (np.argmax).
- acc_norm = [argmax of log-likelihood / len(choice) == gold], len in characters of the choice string as
  doc_to_choice gives it (without the target delimiter; for winogrande, the choice is the partial context).
- the mean over docs; stderr = sample standard deviation (n - 1) / sqrt(n) (`mean_stderr`).
- a group (MMLU) is the mean over all its docs (subjects weighted by size) and its stderr is
  `pooled_sample_stderr` over the subjects.
"""

from __future__ import annotations

import math

import numpy as np


def doc_scores(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    lengths = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice divides by zero, as in lm-eval
        pred_norm = int(np.argmax(np.array(lls) / lengths))
    return {"acc": float(int(np.argmax(lls)) == gold), "acc_norm": float(pred_norm == gold)}


def mean_stderr(values: list[float]) -> float | None:
    """lm-eval's mean_stderr; None (lm-eval's "N/A") for fewer than two values."""
    if len(values) < 2:
        return None
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float | None:
    """lm-eval's pooled_sample_stderr for a group weighted by size."""
    if len(sizes) < 1 or sum(sizes) <= len(sizes) or any(s is None for s in stderrs):
        return None
    pooled_var = sum((n - 1) * se ** 2 * n for n, se in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(pooled_var / sum(sizes))


def summarize(scores: list[dict[str, float]]) -> dict:
    """{acc, acc_stderr, acc_norm, acc_norm_stderr, n} of one list of per-doc scores."""
    out: dict = {"n": len(scores)}
    for metric in ("acc", "acc_norm"):
        values = [s[metric] for s in scores]
        out[metric] = sum(values) / len(values) if values else None
        out[f"{metric}_stderr"] = mean_stderr(values)
    return out


def summarize_groups(groups: dict[str, list[dict[str, float]]]) -> dict:
    """A task's result; with several groups (MMLU subjects) the pooled result plus each group's own."""
    if len(groups) == 1:
        return summarize(next(iter(groups.values())))
    per_group = {name: summarize(scores) for name, scores in groups.items()}
    out = summarize([s for scores in groups.values() for s in scores])
    for metric in ("acc", "acc_norm"):
        out[f"{metric}_stderr"] = pooled_stderr([g[f"{metric}_stderr"] for g in per_group.values()],
                                                [g["n"] for g in per_group.values()])
    out["groups"] = per_group
    return out
