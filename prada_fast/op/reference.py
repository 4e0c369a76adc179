"""The PRADA objective in plain PyTorch, written as in docs/design.md. It materialises the
logits: it is the parity oracle for the chunk driver's backends (PyTorch and Triton), not
the fast path. Call it through `prada_fast.prada_loss(..., impl="reference")`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grl import confusion_term, grad_reverse
from .options import LossOptions


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f_b = sum_t m_bt h_bt / sum_t m_bt  (a row with an empty mask pools to 0)."""
    m = mask.to(hidden.dtype)
    return (m.unsqueeze(-1) * hidden).sum(1) / m.sum(1).clamp_min(1).unsqueeze(-1)


def reference_prada_loss(hidden, lm_weight, targets, o: LossOptions):
    """(loss, parts) of the objective; `o` is checked (prada_loss does it)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for the oracle
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    valid = y != o.ignore_index
    n_tokens = valid.sum()
    n = n_tokens if o.num_valid_tokens is None else torch.as_tensor(o.num_valid_tokens)
    n = n.to(acc).clamp_min(1)

    # Task loss per token: l_i = alpha * ce_i + (1 - alpha) * kd_i.
    z_s = F.linear(h, lm_weight, o.lm_bias).to(acc)
    ce_i = torch.logsumexp(z_s, -1) - z_s.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, ce_i, 0).sum() / n

    if o.has_teacher:
        if o.teacher_logits is None:
            z_t = F.linear(o.teacher_hidden.reshape(-1, o.teacher_hidden.shape[-1]), o.teacher_weight)
        else:
            z_t = o.teacher_logits.reshape(-1, o.teacher_logits.shape[-1])
        tau = o.temperature
        log_p_t = torch.log_softmax(z_t.detach().to(acc) / tau, -1)
        log_p_s = torch.log_softmax(z_s / tau, -1)
        kd_i = tau**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
        kd = torch.where(valid, kd_i, 0).sum() / n
    else:
        kd = ce.new_zeros(())
    loss = o.alpha * ce + (1 - o.alpha) * kd  # alpha is 1 without a teacher

    # Domain loss on pooled features. The head learns from L_dom; what reaches f (and h)
    # depends on the adversary: -lambda * dL_dom/df (GRL), or nothing from L_dom and
    # +lambda * dL_conf/df instead (confusion).
    dom = dom_acc = ce.new_zeros(())
    if o.has_domain:
        f = masked_mean(hidden, o.pool_mask)
        f_in = grad_reverse(f, o.grl_lambda) if o.adversary == "grl" else f.detach()
        c = F.linear(f_in, o.domain_weight, o.domain_bias).to(acc)
        dom = F.cross_entropy(c, o.domain_labels)
        dom_acc = (c.argmax(-1) == o.domain_labels).to(acc).mean()
        loss = loss + dom
        if o.adversary == "confusion":
            loss = loss + confusion_term(f, lambda x: F.linear(x, o.domain_weight, o.domain_bias),
                                         o.grl_lambda).to(acc)

    parts = {"ce": ce.detach(), "kd": kd.detach(), "dom": dom.detach(),
             "dom_acc": dom_acc.detach(), "n_tokens": n_tokens}
    return loss, parts
