"""The PyTorch backend of the chunk driver (`prada_loss(..., impl="chunked")`): the row op
and the domain op of `prada_fast.op.driver` written as tensor operations, the twins of the
Triton kernels in `kernels/`. With the driver it never builds an N x V tensor and computes
the gradients in the forward pass; the trainer uses it on the CPU. Products run in fp32
(CPU bf16 matrix products are slow and imprecise), fp64 for fp64."""
from __future__ import annotations

import torch

from .driver import RowBackend, default_chunk_rows


def _scratch(workspace: dict | None, name: str, like: torch.Tensor) -> torch.Tensor:
    """A C x V buffer reused across the chunks of one call: freeing and re-allocating it per
    chunk costs page faults (glibc returns large blocks to the OS)."""
    if workspace is None:
        return torch.empty_like(like)
    buf = workspace.get(name)
    if buf is None or buf.shape[1] != like.shape[1] or buf.shape[0] < like.shape[0] \
            or buf.dtype != like.dtype:
        buf = workspace[name] = torch.empty_like(like)
    return buf[: like.shape[0]]


def torch_rows(z, z_t, y, scale, *, temperature, alpha, ignore_index, workspace=None, topk=None):
    """Per-row ce and kd of one chunk; overwrites z with dL/dz and uses z_t as scratch (see
    prada_fast.op.driver). Every pass over the chunk is in place or into a reused buffer:
    shifted logits, their exponentials, and row sums; the softmaxes are never normalised
    as tensors, their normalisers are folded into the final scaling of the gradient.
    topk = (ids, logprobs), (C, K) each: the teacher as top-K log-probabilities (z_t is None)."""
    if topk is not None:
        return _topk_rows(z, topk[0], topk[1], y, scale, float(temperature), float(alpha),
                          ignore_index, workspace)
    valid = y != ignore_index
    yc = torch.where(valid, y, 0).unsqueeze(1)
    w = torch.where(valid, scale, 0).to(z.dtype)  # 0 on ignored rows
    tau, a = float(temperature), float(alpha)
    z.sub_(z.amax(1, keepdim=True))  # z := z - max z (the shift cancels in every term)
    z_y = z.gather(1, yc).squeeze(1)
    kd = torch.zeros_like(w)
    if z_t is not None:
        # teacher: z_t := log p_t, e_t := exp(z_t / tau - max) = p_t * s_t
        if tau != 1.0:
            z_t.mul_(1.0 / tau)
        z_t.sub_(z_t.amax(1, keepdim=True)).clamp_(min=-1e30)  # -inf logit: p_t = 0, no 0 * -inf
        e_t = torch.exp(z_t, out=_scratch(workspace, "e_t", z))
        s_t = e_t.sum(1)
        z_t.sub_(s_t.log().unsqueeze(1))
        # KL(p_t || p_s^tau) = sum p_t (log p_t - z/tau) + lse(z/tau), the sum taken over the
        # elementwise difference (no cancellation of two large sums) and pairwise (torch.sum:
        # a mat-vec accumulates 49152 terms to ~1e-4 relative), in place in z_t (dead after)
        if tau != 1.0:
            e_s = torch.mul(z, 1.0 / tau, out=_scratch(workspace, "e_s", z))
            ent_cross = z_t.sub_(e_s).mul_(e_t).sum(1) / s_t  # sum p_t (log p_t - (z - max) / tau)
            e_s.exp_()
            s_tau = e_s.sum(1)
            lse_tau = s_tau.log()
        else:
            ent_cross = z_t.sub_(z).mul_(e_t).sum(1) / s_t
    z.exp_()
    s = z.sum(1)
    lse = s.log()
    ce = torch.where(valid, lse - z_y, 0)
    if z_t is None:
        z.mul_((w * a / s).unsqueeze(1))  # alpha * w * softmax(z)
    elif tau == 1.0:
        kd = torch.where(valid, ent_cross + lse, 0)
        z.mul_((w / s).unsqueeze(1))  # (alpha + 1 - alpha) * w * softmax(z)
        z.addcmul_(e_t, ((1 - a) * w / s_t).unsqueeze(1), value=-1.0)  # - (1-alpha) w p_t
    else:
        kd = torch.where(valid, tau * tau * (ent_cross + lse_tau), 0)
        z.mul_((w * a / s).unsqueeze(1))
        g = (1 - a) * tau * w  # (1-alpha) tau w (softmax(z/tau) - p_t)
        z.addcmul_(e_s, (g / s_tau).unsqueeze(1))
        z.addcmul_(e_t, (g / s_t).unsqueeze(1), value=-1.0)
    z.scatter_add_(1, yc, (-a * w).unsqueeze(1))  # - alpha * w * onehot(y)
    return ce, kd


def topk_prepare(z, ids, q, y, ignore_index):
    """Before a top-K chunk's passes over the vocabulary (the Triton launcher does the same): the ids of
    ignored rows replaced by 0..K-1 (they are never read, and may be anything), the student's
    logits at the ids (zk, (C, K)) and at the target (z_y, (C,)) read out, then z set to -inf
    at the ids, so that a pass over z sees the ids outside the K alone. Ignored rows get
    q = 0 (finite; their loss and gradient are 0 anyway). Returns (ids, q in fp32 or fp64, zk,
    z_y), zk and z_y in z's dtype."""
    valid = y != ignore_index
    K = ids.shape[1]
    ids = torch.where(valid.unsqueeze(1), ids, torch.arange(K, device=ids.device))
    q = torch.where(valid.unsqueeze(1), q.to(torch.promote_types(z.dtype, torch.float32)), 0)
    zk = z.gather(1, ids)
    z_y = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    z.scatter_(1, ids, float("-inf"))
    return ids, q, zk, z_y


def teacher_tail(q):
    """The teacher's tail mass r_t = 1 - sum exp(q) = -expm1(logsumexp(q)) per row, from (C, K)
    log-probabilities, clamped at 0 (rounding may leave sum exp(q) slightly above 1). The sum is
    taken in fp64 (C x K values: cheap): in fp32 its rounding alone is ~1e-7, all of r_t when
    the K ids hold nearly all the mass."""
    return (-torch.expm1(torch.logsumexp(q.double(), 1))).clamp_min(0).to(q.dtype)


def _topk_rows(z, ids, q, y, scale, tau, a, ignore_index, workspace):
    """The row op with a top-K teacher (docs/design.md): the teacher's distribution is its K
    probabilities p_t,j = exp(q_j) plus the tail r_t on the ids outside the K, and
        dL/dz = w * (alpha * (softmax(z) - onehot(y)) + (1 - alpha) * tau * (softmax(z / tau) - t))
    with t = p_t on the K ids and t = r_t * softmax_out(z / tau) outside them (the tail spread
    like the student's own distribution there); outside, the KD part is then
    (r_s - r_t) * softmax_out(z / tau). The sums over the ids outside the K are taken with
    their own max (z is -inf at the ids), so r_s = exp(lse_out - lse) never comes from 1 - sum."""
    valid = y != ignore_index
    w = torch.where(valid, scale, 0).to(z.dtype)
    ids, q, zk, z_y = topk_prepare(z, ids, q, y, ignore_index)
    acc = q.dtype
    zk = zk.to(acc)
    # outside the K: max, then sum-exp at tau and at 1 (z is -inf at the ids; no id outside
    # at K = V: m_out = -inf, shift by 0 and the sums are 0)
    m_out = z.amax(1)
    has_out = torch.isfinite(m_out)
    z.sub_(torch.where(has_out, m_out, 0).unsqueeze(1))
    if tau != 1.0:
        e_s = torch.mul(z, 1.0 / tau, out=_scratch(workspace, "e_s", z)).exp_()
        s_out_tau = e_s.sum(1, dtype=acc)
    z.exp_()
    s_out = z.sum(1, dtype=acc)
    if tau == 1.0:
        e_s, s_out_tau = z, s_out
    m_o = torch.where(has_out, m_out.to(acc), 0)
    lse_out = torch.where(has_out, m_o + s_out.log(), float("-inf"))
    lse_out_tau = torch.where(has_out, m_o / tau + s_out_tau.log(), float("-inf"))
    lse = torch.logaddexp(lse_out, torch.logsumexp(zk, 1))
    lse_tau = torch.logaddexp(lse_out_tau, torch.logsumexp(zk / tau, 1))
    ce = torch.where(valid, lse - z_y.to(acc), 0)
    # teacher: p_t on the K ids, r_t outside
    p_t = q.exp()
    r_t = teacher_tail(q)
    log_ps_k = zk / tau - lse_tau.unsqueeze(1)
    inside = torch.where(p_t != 0, p_t * (q - log_ps_k), 0).sum(1)  # p_t = 0 adds 0; NaN stays
    log_r_s = torch.where(has_out, lse_out_tau - lse_tau, 0)
    r_s = torch.where(has_out, log_r_s.exp(), 0)
    tail = torch.where(has_out, torch.special.xlogy(r_t, r_t) - r_t * log_r_s, 0)  # 0 at K = V
    kd = torch.where(valid, tau * tau * (inside + tail), 0)
    # dL/dz outside the K: alpha * w * softmax(z), plus (1 - alpha) tau w (r_s - r_t) softmax_out(z / tau)
    g = (1 - a) * tau * w.to(acc)
    c_ce = a * w.to(acc) * torch.where(has_out, (m_o - lse).exp(), 0)  # z now holds exp(z - m_out)
    c_kd = torch.where(has_out, g * (r_s - r_t) / torch.where(has_out, s_out_tau, 1), 0)
    if tau == 1.0:
        z.mul_((c_ce + c_kd).to(z.dtype).unsqueeze(1))
    else:
        z.mul_(c_ce.to(z.dtype).unsqueeze(1))
        z.addcmul_(e_s, c_kd.to(z.dtype).unsqueeze(1))
    yc = torch.where(valid, y, 0).unsqueeze(1)
    z.scatter_add_(1, yc, (-a * w).unsqueeze(1))  # - alpha w onehot(y); overwritten below if y is an id
    # the K ids: alpha w (softmax(z) - onehot(y)) + (1 - alpha) tau w (p_s^tau - p_t)
    gk = a * w.to(acc).unsqueeze(1) * ((zk - lse.unsqueeze(1)).exp() - (ids == yc).to(acc))
    gk += g.unsqueeze(1) * (log_ps_k.exp() - p_t)
    z.scatter_(1, ids, gk.to(z.dtype))
    return ce, kd


def pool_features(hidden, mask, seq_index, num_seqs, acc):
    """(f, msum): the masked-mean features and their clamped denominators, in `acc`. One per
    row ((B, H), (B,)), or with seq_index one per sequence ((S, H), (S,), S = num_seqs): only
    the positions of a sequence with a nonzero mask are read. An empty pool gives f = 0."""
    if seq_index is None:
        m = mask.to(acc)
        msum = m.sum(1).clamp_min(1)
        return torch.einsum("bt,bth->bh", m, hidden.to(acc)) / msum[:, None], msum
    m = mask.to(acc)
    bi, ti = ((seq_index >= 0) & (m != 0)).nonzero(as_tuple=True)
    idx, w = seq_index[bi, ti], m[bi, ti]
    msum = torch.zeros(num_seqs, dtype=acc, device=hidden.device).index_add_(0, idx, w).clamp_min_(1)
    f = torch.zeros(num_seqs, hidden.shape[-1], dtype=acc, device=hidden.device)
    f.index_add_(0, idx, hidden[bi, ti].to(acc) * w[:, None])
    return f / msum[:, None], msum


def torch_domain(hidden, mask, weight, bias, labels, adv_lambda, adversary="grl", seq_index=None):
    """Masked-mean pooling (per row, or per sequence of packed rows with seq_index), linear
    domain head, CE and accuracy, and the gradients (see prada_fast.op.driver for gf). The
    head's gradients come from L_dom; gf is -lambda * dL_dom/df ("grl") or +lambda * dL_conf/df
    ("confusion"), over the pool's sum of m."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    f, msum = pool_features(hidden, mask, seq_index, labels.shape[0], acc)
    S = f.shape[0]  # sequences: B, or len(labels) with seq_index
    wf = weight.to(acc)
    c = f @ wf.t()
    if bias is not None:
        c = c + bias.to(acc)
    logp = torch.log_softmax(c, 1)
    dom = -logp.gather(1, labels[:, None]).mean()
    hit = (c.argmax(1) == labels).to(acc).mean()
    p = logp.exp()
    dc = p.clone()
    dc[torch.arange(S, device=c.device), labels] -= 1
    dc /= S
    if adversary == "grl":
        gf = (-adv_lambda) * (dc @ wf) / msum[:, None]
    else:  # dL_conf/dc_s = (softmax(c_s) - 1/D) / S
        gf = adv_lambda * (((p - 1.0 / c.shape[1]) / S) @ wf) / msum[:, None]
    return dom, hit, gf, dc.t() @ f, dc.sum(0)


TORCH_BACKEND = RowBackend(
    name="chunked", rows=torch_rows, domain=torch_domain,
    compute_dtype=lambda dtype: torch.promote_types(dtype, torch.float32),
    chunk_rows=lambda n_rows, vocab, hidden, has_teacher: default_chunk_rows(n_rows, vocab))
