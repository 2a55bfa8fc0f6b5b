"""Task and distillation losses (distilled DeiT's two heads handled)."""
from __future__ import annotations

import torch.nn.functional as F


def logits(out):
    """One logits tensor: the mean of a distilled DeiT's two heads in training mode."""
    if isinstance(out, (tuple, list)):
        return sum(out) / len(out)
    return out


def task_loss(out, target, smoothing: float):
    """Cross-entropy, averaged over both heads of a distilled DeiT.

    Class-index ``target [B]``: with label smoothing. Soft ``target [B, classes]``
    (mixup / cutmix, smoothing already inside): timm's ``SoftTargetCrossEntropy``.
    """
    if target.dim() == 2:
        from timm.loss import SoftTargetCrossEntropy

        fn = SoftTargetCrossEntropy()
    else:
        def fn(o, t):
            return F.cross_entropy(o, t, label_smoothing=smoothing)
    if isinstance(out, (tuple, list)):
        return sum(fn(o, target) for o in out) / len(out)
    return fn(out, target)


def kd_loss(student, teacher, temperature: float):
    """Soft knowledge distillation: ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    if isinstance(student, (tuple, list)):
        student = student[-1]
    teacher = logits(teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)
