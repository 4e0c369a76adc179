"""Distribution matching of the domains' pooled features: a kernel MMD term.

A linear domain head, and the student playing against it, act on D directions of the
pooled features only: the layer probes (docs/results.md) show the domain erased inside the
head's row span and intact outside it. The maximum mean discrepancy with a Gaussian kernel
has no such blind subspace: it is zero only when two feature distributions are equal.

    MMD^2(A, B) = mean k(a, a') + mean k(b, b') - 2 mean k(a, b)     (biased V-statistic)
    k(x, y) = sum_s exp(-|x - y|^2 / (s * sigma^2))

with sigma^2 the batch's median squared pairwise distance (no gradient) and s over
`SCALES`, the multi-kernel form of Long et al. 2015 (DAN). Over D domains the term is the
mean of MMD^2 over the pairs of domains present in the batch. The biased estimator is >= 0
and works with one example per domain, which small batches over several domains need.
"""
from __future__ import annotations

import torch

SCALES = (0.5, 1.0, 2.0)  # bandwidths around the median heuristic, as DAN's multi-kernel


def mmd_term(f: torch.Tensor, labels: torch.Tensor, scales=SCALES, sigma2=None) -> torch.Tensor:
    """Mean over pairs of domains present in `labels` (B,) of the squared MMD between their
    rows of `f` (B, H); 0 (with a gradient of zeros) when fewer than two domains are present.
    sigma2: the kernel's base bandwidth; default the median heuristic on this batch."""
    x = f.to(torch.promote_types(f.dtype, torch.float32))
    d2 = (x[:, None] - x[None]).pow(2).sum(-1)  # exact at 0 (cdist's gradient is not)
    if sigma2 is None:
        off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        sigma2 = d2.detach()[off].median().clamp_min(1e-12) if len(x) > 1 else d2.new_ones(())
    k = sum(torch.exp(-d2 / (s * sigma2)) for s in scales)
    domains = labels.unique()
    terms = []
    for i, a in enumerate(domains):
        for b in domains[i + 1:]:
            ia, ib = labels == a, labels == b
            terms.append(k[ia][:, ia].mean() + k[ib][:, ib].mean() - 2 * k[ia][:, ib].mean())
    if not terms:
        return (x * 0).sum()
    return torch.stack(terms).mean()
