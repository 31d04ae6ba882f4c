"""Training objectives over next-token logits: cross-entropy, distillation from a teacher, or a weighted mix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvshrink.uptrain.recipe import Loss


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose next token is real (not padding)."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the softened next-token distributions, times temperature² (Hinton et al.) so
    gradients keep their scale across temperatures; averaged over the positions lm_loss scores."""
    keep = attention_mask[:, 1:].bool()
    student, teacher = student_logits[:, :-1], teacher_logits[:, :-1]
    if not bool(keep.all()):  # selecting rows copies the (tokens x vocabulary) logits: only when padding is there
        student, teacher = student[keep], teacher[keep]
    student = F.log_softmax(student.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def training_loss(
    spec: Loss,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's objective, and its parts (detached) for logging."""
    parts: dict[str, torch.Tensor] = {}
    if spec.kind in ("lm", "mix"):
        parts["lm_loss"] = lm_loss(logits, input_ids, attention_mask)
    if spec.kind in ("distill", "mix"):
        parts["distill_loss"] = distill_loss(logits, teacher_logits, attention_mask, spec.temperature)
    if spec.kind == "lm":
        loss = parts["lm_loss"]
    elif spec.kind == "distill":
        loss = parts["distill_loss"]
    else:
        loss = (1 - spec.distill_weight) * parts["lm_loss"] + spec.distill_weight * parts["distill_loss"]
    return loss, {name: value.detach() for name, value in parts.items()}
