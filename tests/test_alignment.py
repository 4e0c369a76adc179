"""The MMD alignment term (--adversary mmd): against a float64 loop over examples, its
gradient by finite differences, and the model's loss = the watching head's + lambda * MMD."""
import itertools
import math

import pytest
import torch

from prada_fast.models.mmd import SCALES, mmd_term
from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
from prada_fast.op import masked_mean


def mmd_loops(f, labels):
    """The definition written out with Python loops over examples, in float64."""
    f = f.double().tolist()
    labels = labels.tolist()
    B = len(f)
    d2 = [[sum((a - b) ** 2 for a, b in zip(f[i], f[j])) for j in range(B)] for i in range(B)]
    off = sorted(d2[i][j] for i in range(B) for j in range(B) if i != j)
    mid = len(off) // 2
    sigma2 = off[mid] if len(off) % 2 else off[mid - 1]  # torch.median: the lower middle

    def k(i, j):
        return sum(math.exp(-d2[i][j] / (s * sigma2)) for s in SCALES)

    def mean_k(A, Bs):
        return sum(k(i, j) for i in A for j in Bs) / (len(A) * len(Bs))

    groups = {d: [i for i in range(B) if labels[i] == d] for d in sorted(set(labels))}
    pairs = list(itertools.combinations(groups.values(), 2))
    return sum(mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b) for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("seed,B,H,D", [(0, 7, 5, 3), (1, 13, 9, 4), (2, 5, 3, 5)])
def test_mmd_equals_the_definition(seed, B, H, D):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, H, generator=g) * 2 + torch.randn(1, H, generator=g)
    labels = torch.randint(0, D, (B,), generator=g)
    labels[:2] = torch.tensor([0, 1])  # at least two domains present
    got = mmd_term(f, labels)
    assert got.dtype == torch.float32
    assert abs(got.item() - mmd_loops(f, labels)) <= 1e-5 * max(1.0, abs(got.item()))


def test_mmd_gradient_and_limits():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 0])
    # the bandwidth is a constant of the batch (no gradient): hold it fixed for finite differences
    d2 = torch.cdist(f, f).pow(2).detach()
    sigma2 = d2[~torch.eye(11, dtype=torch.bool)].median()
    torch.testing.assert_close(mmd_term(f, labels), mmd_term(f, labels, sigma2=sigma2))
    torch.autograd.gradcheck(lambda x: mmd_term(x, labels, sigma2=sigma2), (f,), eps=1e-6, atol=1e-6)
    # two domains with the same examples: 0; far apart: near 2 * len(SCALES) (k(a, b) -> 0)
    same = torch.cat([f.detach()[:4], f.detach()[:4]])
    assert mmd_term(same, torch.tensor([0] * 4 + [1] * 4)).abs().item() < 1e-12
    far = torch.cat([f.detach()[:4], f.detach()[:4] + 1e3])
    assert mmd_term(far, torch.tensor([0] * 4 + [1] * 4)).item() > 2 * len(SCALES) * 0.5 - 1e-9
    # one domain present: zero, with a zero gradient
    one = f.detach().clone().requires_grad_()
    out = mmd_term(one, torch.zeros(11, dtype=torch.long))
    out.backward()
    assert out.item() == 0 and one.grad.abs().sum() == 0


def test_model_loss_is_the_watching_head_plus_lambda_mmd():
    """--adversary mmd: the head trains on L_dom with nothing flowing back (confusion at
    lambda 0), and lambda * MMD(pooled question features) is added to the loss."""
    student, _ = load_causal_lm("tiny", seed=5)
    g = torch.Generator().manual_seed(7)
    B, T = 6, 19
    ids = torch.randint(3, 259, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 14:] = 0
    labels = ids.clone()
    labels[:, :7] = -100
    labels[mask == 0] = -100
    dom = torch.tensor([0, 1, 2, 0, 1, 2])
    mmd = PradaModel(student, PradaConfig(n_domains=3, n_prompt=2, adversary="mmd", loss_impl="chunked"))
    watch = PradaModel(student, PradaConfig(n_domains=3, n_prompt=2, adversary="confusion",
                                            loss_impl="chunked"))
    watch.load_state_dict(mmd.state_dict())
    loss, parts = mmd(ids, mask, labels, dom, adv_lambda=0.7)
    base, _ = watch(ids, mask, labels, dom, adv_lambda=0.0)
    hidden, _ = mmd.hidden_states(ids, mask)
    align = mmd_term(masked_mean(hidden, mmd.pool_mask(mask, labels).to(hidden.dtype)), dom)
    torch.testing.assert_close(parts["mmd"], align.detach())
    torch.testing.assert_close(loss, base + 0.7 * align, rtol=1e-6, atol=1e-6)
    assert align.item() > 0
    loss.backward()
    assert mmd.domain_head.out.weight.grad.abs().sum() > 0
