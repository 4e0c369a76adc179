"""The PRADA objective in plain PyTorch, written as in docs/design.md. It materialises the
logits: it is the parity oracle for the chunk driver's backends (PyTorch and Triton), not
the fast path. Call it through `prada_fast.prada_loss(..., impl="reference")`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adversary import confusion_term, grad_reverse
from .options import LossOptions


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor | None = None,
                num_seqs: int | None = None) -> torch.Tensor:
    """Pooled features of the domain term, differentiable in `hidden` (B, T, H).

    Without seq_index, one per row: f_b = sum_t m_bt h_bt / sum_t m_bt, (B, H).
    With seq_index (B, T) int64 (packed rows: each position's sequence in [0, S), -1: none),
    one per sequence: f_s = sum_{bt: seq_bt = s} m_bt h_bt / sum_{bt: seq_bt = s} m_bt, (S, H),
    S = num_seqs (default: max(seq_index) + 1, a host sync). A row or sequence with an empty
    mask (or, packed, no position at all) pools to 0."""
    if seq_index is None:
        m = mask.to(hidden.dtype)
        return (m.unsqueeze(-1) * hidden).sum(1) / m.sum(1).clamp_min(1).unsqueeze(-1)
    H = hidden.shape[-1]
    S = int(seq_index.max()) + 1 if num_seqs is None else int(num_seqs)
    acc = torch.promote_types(hidden.dtype, torch.float32)  # sums in fp32 (fp64 for fp64)
    # only the pooled positions are read: a -1 position's values never reach a sequence
    bi, ti = ((seq_index >= 0) & (mask != 0)).nonzero(as_tuple=True)
    idx, w = seq_index[bi, ti], mask[bi, ti].to(acc)
    total = hidden.new_zeros(S, H, dtype=acc).index_add(0, idx, w.unsqueeze(-1) * hidden[bi, ti].to(acc))
    count = w.new_zeros(S).index_add(0, idx, w)
    return (total / count.clamp_min(1).unsqueeze(-1)).to(hidden.dtype)


def topk_kd(z_s: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row KD from a top-K teacher (docs/design.md), differentiable in the student logits.

    z_s (M, V) student logits; ids (M, K) distinct teacher ids; q (M, K) the teacher's
    log-probabilities at tau of those ids. With p_t = exp(q), the teacher's tail mass
    r_t = 1 - sum p_t = -expm1(logsumexp(q)) (clamped at 0: rounding may leave sum p_t > 1),
    p_s = softmax(z_s / tau) and r_s its mass outside the ids:
        kd = tau^2 * [sum_j p_t,j (q_j - log p_s(ids_j)) + r_t (log r_t - log r_s)]
    log r_s is a log-sum-exp over the ids outside the K minus the full one (no 1 - sum). At
    K = V there is no id outside and the tail term is 0, whatever rounding leaves in r_t."""
    acc = z_s.dtype
    x = z_s / tau
    lse = torch.logsumexp(x, -1)
    q = q.detach().to(acc)
    p_t = q.exp()
    log_ps_k = x.gather(1, ids) - lse.unsqueeze(1)
    inside = torch.where(p_t != 0, p_t * (q - log_ps_k), 0).sum(-1)  # p_t = 0: adds 0, not 0 * -inf
    if ids.shape[1] == x.shape[1]:  # K = V (ids distinct): nothing outside
        return tau**2 * inside
    r_t = (-torch.expm1(torch.logsumexp(q, -1))).clamp_min(0)
    log_r_s = torch.logsumexp(x.scatter(1, ids, float("-inf")), -1) - lse
    tail = torch.special.xlogy(r_t, r_t) - r_t * log_r_s
    return tau**2 * (inside + tail)


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

    if o.has_topk_teacher:
        kd_i = topk_kd(z_s[valid], o.teacher_topk_ids.reshape(-1, o.teacher_topk_ids.shape[-1])[valid],
                       o.teacher_topk_logprobs.reshape(-1, o.teacher_topk_ids.shape[-1])[valid],
                       o.temperature)
        kd = kd_i.sum() / n
    elif o.has_teacher:
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
        # one feature per row, or per sequence of packed rows (seq_index; S = len(domain_labels))
        f = masked_mean(hidden, o.pool_mask, o.seq_index, o.domain_labels.shape[0])
        f_in = grad_reverse(f, o.adv_lambda) if o.adversary == "grl" else f.detach()
        c = F.linear(f_in, o.domain_weight, o.domain_bias).to(acc)
        dom = F.cross_entropy(c, o.domain_labels)
        dom_acc = (c.argmax(-1) == o.domain_labels).to(acc).mean()
        loss = loss + dom
        if o.adversary == "confusion":
            loss = loss + confusion_term(f, lambda x: F.linear(x, o.domain_weight, o.domain_bias),
                                         o.adv_lambda).to(acc)

    parts = {"ce": ce.detach(), "kd": kd.detach(), "dom": dom.detach(),
             "dom_acc": dom_acc.detach(), "n_tokens": n_tokens}
    return loss, parts
