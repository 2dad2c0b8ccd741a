"""Loss functions as sums, so that micro-batches, accumulation steps and processes add up to one global mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.train.data import IGNORE


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one; IGNORE skipped."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's completion tokens: logits (N, T, V) -> (N,), as TRL's concatenated_forward."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's sigmoid DPO loss per pair, with the implicit rewards (trl/trainer/dpo_trainer.py `dpo_loss`).

    logits = (pi_c - pi_r) - (ref_c - ref_r); loss = -logsigmoid(beta logits)(1 - ls) - logsigmoid(-beta logits) ls;
    rewards = beta (pi - ref), detached. All (B,).
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
