"""The chunked implementation of `prada_loss` in plain PyTorch: the fused algorithm of
`prada_fast.fused` with the row and domain steps written as tensor operations. It never
builds an N x V tensor and computes the gradients in the forward pass; the trainer uses
it on the CPU. Products run in fp32 (CPU bf16 matrix products are slow and imprecise), fp64 for fp64."""
from __future__ import annotations

import torch

from .fused import fused_prada_loss


def torch_rows(z, z_t, y, scale, *, temperature, alpha, ignore_index):
    """Per-row ce and kd of one chunk; overwrites z with dL/dz (see prada_fast.fused)."""
    valid = y != ignore_index
    yc = torch.where(valid, y, 0).unsqueeze(1)
    w = torch.where(valid, scale, 0).unsqueeze(1).to(z.dtype)  # 0 on ignored rows
    lse = torch.logsumexp(z, 1, keepdim=True)
    ce = torch.where(valid, (lse - z.gather(1, yc)).squeeze(1), 0)
    kd = torch.zeros_like(ce)
    if z_t is not None:
        tau = temperature
        log_pt = torch.log_softmax(z_t.to(z.dtype) / tau, 1)
        log_ps = z / tau
        log_ps -= torch.logsumexp(log_ps, 1, keepdim=True)
        p_t = log_pt.exp()
        kd = torch.where(valid, tau * tau * (p_t * (log_pt - log_ps)).sum(1), 0)
        # (1 - alpha) * tau * (softmax(z/tau) - p_t), built in the teacher's buffer
        kd_grad = log_ps.exp_().sub_(p_t).mul_((1 - alpha) * tau)
        del log_pt, p_t
    z.sub_(lse).exp_()  # softmax(z)
    if alpha != 1.0:
        z.mul_(alpha)
    z.scatter_add_(1, yc, torch.full_like(lse, -alpha))  # - alpha * onehot(y)
    if z_t is not None:
        z.add_(kd_grad)
    z.mul_(w)
    return ce, kd


def torch_domain(hidden, mask, weight, bias, labels, grl_lambda):
    """Masked-mean pooling, linear domain head, CE and accuracy, and the gradients (see
    prada_fast.fused for gf)."""
    B = hidden.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(acc)
    msum = m.sum(1).clamp_min(1)
    f = torch.einsum("bt,bth->bh", m, hidden.to(acc)) / msum[:, None]
    wf = weight.to(acc)
    c = f @ wf.t()
    if bias is not None:
        c = c + bias.to(acc)
    logp = torch.log_softmax(c, 1)
    dom = -logp.gather(1, labels[:, None]).mean()
    hit = (c.argmax(1) == labels).to(acc).mean()
    dc = logp.exp()
    dc[torch.arange(B, device=c.device), labels] -= 1
    dc /= B
    gf = (-grl_lambda) * (dc @ wf) / msum[:, None]
    return dom, hit, gf, dc.t() @ f, dc.sum(0)


def chunked_prada_loss(hidden, lm_weight, targets, *, chunk_rows=None, **kw):
    """prada_loss(impl="chunked"): see prada_fast.loss.prada_loss for the arguments."""
    return fused_prada_loss(hidden, lm_weight, targets, rows_fn=torch_rows, domain_fn=torch_domain,
                            chunk_rows=chunk_rows,
                            compute_dtype=torch.promote_types(hidden.dtype, torch.float32), **kw)
