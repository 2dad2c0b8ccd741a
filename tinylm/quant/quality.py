"""The quality gate: how far a quantized model's next-token distributions move from the unquantized model's.

On a fixed text (sample_text.py), both models score every position; we report the mean KL(P_float || P_quant), the
share of positions where both pick the same top-1 token, and the perplexity of each on the text. Each built-in
policy has thresholds; a policy over any of them fails, and says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tinylm.quant.sample_text import QUALITY_SAMPLE


@dataclass(frozen=True)
class Gate:
    max_kl: float  # mean KL divergence, nats per token
    min_top1: float  # share of positions with the same argmax
    max_ppl_increase: float  # perplexity ratio - 1


# Thresholds per built-in policy. 8-bit must be nearly lossless; 4-bit policies are allowed the loss that a
# well-chosen 4-bit scheme shows on small models (llama.cpp's Q4 files move KL by a few hundredths of a nat).
GATES = {
    "int8": Gate(max_kl=0.02, min_top1=0.93, max_ppl_increase=0.02),
    "w8a8": Gate(max_kl=0.02, min_top1=0.93, max_ppl_increase=0.02),
    "int4": Gate(max_kl=0.10, min_top1=0.85, max_ppl_increase=0.10),
    "qkv-fp16": Gate(max_kl=0.10, min_top1=0.85, max_ppl_increase=0.10),
    "int4-tiedq": Gate(max_kl=0.10, min_top1=0.85, max_ppl_increase=0.10),
}


@dataclass
class QualityReport:
    policy: str
    tokens: int
    kl: float
    top1: float
    ppl_reference: float
    ppl: float
    gate: Gate | None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def ppl_increase(self) -> float:
        return self.ppl / self.ppl_reference - 1

    def line(self) -> str:
        verdict = "no gate" if self.gate is None else ("PASS" if self.passed else "FAIL: " + "; ".join(self.failures))
        return (f"{self.policy}: KL {self.kl:.4f}, top-1 agreement {self.top1:.3f}, perplexity {self.ppl:.3f} vs "
                f"{self.ppl_reference:.3f} ({self.ppl_increase:+.2%}) over {self.tokens} tokens: {verdict}")


def distribution_metrics(reference: torch.Tensor, quantized: torch.Tensor, targets: torch.Tensor) -> dict:
    """reference, quantized: logits (T, V); targets (T - 1,) the next tokens -> kl, top1, both perplexities."""
    ref = reference.float().log_softmax(-1)
    quant = quantized.float().log_softmax(-1)
    kl = (ref.exp() * (ref - quant)).sum(-1).mean()  # KL(P_ref || P_quant) per position, averaged
    top1 = (ref.argmax(-1) == quant.argmax(-1)).float().mean()
    rows = torch.arange(targets.shape[0])

    def ppl(logp: torch.Tensor) -> float:
        return float(torch.exp(-logp[:-1][rows, targets].mean()))
    return {"kl": float(kl), "top1": float(top1), "ppl_reference": ppl(ref), "ppl": ppl(quant)}


class Reference:
    """The unquantized model's logits on the text, computed once for every policy compared with it."""

    def __init__(self, llm, text: str = QUALITY_SAMPLE) -> None:
        self.ids = llm.encode(text)[:llm.config.max_position_embeddings]
        self.logits = llm.forward([self.ids]).logits[0]  # (T, V)


def evaluate(reference, quantized, policy: str, text: str = QUALITY_SAMPLE, gate: Gate | None = None
             ) -> QualityReport:
    """reference: the unquantized tinylm.LLM (or a Reference of it); quantized: an LLM with the same tokenizer.
    `policy` names the gate applied unless `gate` is given."""
    if not isinstance(reference, Reference):
        reference = Reference(reference, text)
    logits = quantized.forward([reference.ids]).logits[0]
    metrics = distribution_metrics(reference.logits, logits, torch.tensor(reference.ids[1:]))
    gate = gate or GATES.get(policy.partition(":")[0])
    report = QualityReport(policy, len(reference.ids), gate=gate, **metrics)
    if gate is not None:
        report.failures = _failures(report, gate)
    return report


def _failures(report: QualityReport, gate: Gate) -> list[str]:
    failures = []
    if report.kl > gate.max_kl:
        failures.append(f"KL {report.kl:.4f} > {gate.max_kl}")
    if report.top1 < gate.min_top1:
        failures.append(f"top-1 {report.top1:.3f} < {gate.min_top1}")
    if report.ppl_increase > gate.max_ppl_increase:
        failures.append(f"perplexity +{report.ppl_increase:.2%} > +{gate.max_ppl_increase:.0%}")
    return failures
