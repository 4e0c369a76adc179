"""The PyTorch backend of the chunk driver (`prada_loss(..., impl="chunked")`): the row op
and the domain op of `prada_fast.op.driver` written as tensor operations, the twins of the
Triton kernels in `kernels/`. With the driver it never builds an N x V tensor and computes
the gradients in the forward pass; the trainer uses it on the CPU. Products run in fp32
(CPU bf16 matrix products are slow and imprecise), fp64 for fp64."""
from __future__ import annotations

import torch

from .driver import RowBackend, default_chunk_rows


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[r, v] * b[r, v] per row, as a batched mat-vec (no C x V temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


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


def torch_rows(z, z_t, y, scale, *, temperature, alpha, ignore_index, workspace=None):
    """Per-row ce and kd of one chunk; overwrites z with dL/dz and uses z_t as scratch (see
    prada_fast.op.driver). Every pass over the chunk is in place or into a reused buffer:
    shifted logits, their exponentials, and row sums; the softmaxes are never normalised
    as tensors, their normalisers are folded into the final scaling of the gradient."""
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
        # KL(p_t || p_s^tau) = sum p_t log p_t - sum p_t (z/tau - lse(z/tau))
        if tau != 1.0:
            e_s = torch.mul(z, 1.0 / tau, out=_scratch(workspace, "e_s", z))
            cross = _rowdot(e_t, e_s) / s_t  # sum p_t * (z - max) / tau
            e_s.exp_()
            s_tau = e_s.sum(1)
            lse_tau = s_tau.log()
        else:
            cross = _rowdot(e_t, z) / s_t
        ent = _rowdot(e_t, z_t) / s_t  # sum p_t log p_t
    z.exp_()
    s = z.sum(1)
    lse = s.log()
    ce = torch.where(valid, lse - z_y, 0)
    if z_t is None:
        z.mul_((w * a / s).unsqueeze(1))  # alpha * w * softmax(z)
    elif tau == 1.0:
        kd = torch.where(valid, ent - cross + lse, 0)
        z.mul_((w / s).unsqueeze(1))  # (alpha + 1 - alpha) * w * softmax(z)
        z.addcmul_(e_t, ((1 - a) * w / s_t).unsqueeze(1), value=-1.0)  # - (1-alpha) w p_t
    else:
        kd = torch.where(valid, tau * tau * (ent - cross + lse_tau), 0)
        z.mul_((w * a / s).unsqueeze(1))
        g = (1 - a) * tau * w  # (1-alpha) tau w (softmax(z/tau) - p_t)
        z.addcmul_(e_s, (g / s_tau).unsqueeze(1))
        z.addcmul_(e_t, (g / s_t).unsqueeze(1), value=-1.0)
    z.scatter_add_(1, yc, (-a * w).unsqueeze(1))  # - alpha * w * onehot(y)
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


def torch_domain(hidden, mask, weight, bias, labels, grl_lambda, adversary="grl", seq_index=None):
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
        gf = (-grl_lambda) * (dc @ wf) / msum[:, None]
    else:  # dL_conf/dc_s = (softmax(c_s) - 1/D) / S
        gf = grl_lambda * (((p - 1.0 / c.shape[1]) / S) @ wf) / msum[:, None]
    return dom, hit, gf, dc.t() @ f, dc.sum(0)


TORCH_BACKEND = RowBackend(
    name="chunked", rows=torch_rows, domain=torch_domain,
    compute_dtype=lambda dtype: torch.promote_types(dtype, torch.float32),
    chunk_rows=lambda n_rows, vocab, hidden, has_teacher: default_chunk_rows(n_rows, vocab))
