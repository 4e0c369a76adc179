"""The reference objective against a float64 computation written out by hand, token by
token, from the equations of docs/design.md; the GRL sign and scale; the normaliser under
gradient accumulation; the lambda schedule."""
import math

import pytest
import torch

from prada_fast import dann_lambda, grad_reverse, lambda_at, prada_loss

B, T, H, V, D, HT = 3, 7, 10, 23, 3, 6


def hand_loss(h, W, b, y, u, Wt, tau, alpha, m, Wd, bd, d, n=None):
    """L_task + L_dom in float64, one token and one sequence at a time."""
    ce_sum = kd_sum = 0.0
    valid = 0
    for bi in range(h.shape[0]):
        for t in range(h.shape[1]):
            if y[bi, t] == -100:
                continue
            valid += 1
            z = W @ h[bi, t] + b
            ce_sum = ce_sum + torch.logsumexp(z, 0) - z[y[bi, t]]
            if u is not None:
                zt = Wt @ u[bi, t]
                pt = torch.softmax(zt / tau, 0)
                kd_sum = kd_sum + tau**2 * (pt * (torch.log(pt) - torch.log_softmax(z / tau, 0))).sum()
    n = valid if n is None else n
    a = alpha if u is not None else 1.0
    task = (a * ce_sum + (1 - a) * kd_sum) / max(n, 1)
    dom = 0.0
    for bi in range(h.shape[0]):
        f = (m[bi, :, None] * h[bi]).sum(0) / m[bi].sum()
        c = Wd @ f + bd
        dom = dom + (torch.logsumexp(c, 0) - c[d[bi]]) / h.shape[0]
    return task, dom


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2, 5:] = -100
    m = (torch.rand(B, T, generator=g) > 0.3).double()
    m[:, 0] = 1
    return dict(h=r(B, T, H), W=r(V, H), b=r(V), y=y, u=r(B, T, HT), Wt=r(V, HT), m=m,
                Wd=r(D, H), bd=r(D), d=torch.randint(0, D, (B,), generator=g))


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_reference_matches_hand_computation(with_teacher, adversary, seed):
    x = inputs(seed)
    tau, alpha, lam = 1.7, 0.3, 0.6
    leaves = {k: x[k].clone().requires_grad_() for k in ("h", "W", "b", "Wd", "bd")}
    loss, parts = prada_loss(
        leaves["h"], leaves["W"], x["y"], lm_bias=leaves["b"],
        teacher_hidden=x["u"] if with_teacher else None,
        teacher_weight=x["Wt"] if with_teacher else None, temperature=tau, alpha=alpha,
        pool_mask=x["m"], domain_weight=leaves["Wd"], domain_bias=leaves["bd"],
        domain_labels=x["d"], adv_lambda=lam, adversary=adversary, impl="reference")
    loss.backward()

    hand = {k: x[k].clone().requires_grad_() for k in ("h", "W", "b", "Wd", "bd")}
    task, dom = hand_loss(hand["h"], hand["W"], hand["b"], x["y"], x["u"] if with_teacher else None,
                          x["Wt"], tau, alpha, x["m"], hand["Wd"], hand["bd"], x["d"])
    torch.testing.assert_close(loss.detach(), (task + dom).detach(), rtol=1e-12, atol=1e-12)
    assert parts["n_tokens"] == int((x["y"] != -100).sum())
    torch.testing.assert_close(parts["dom"], dom.detach(), rtol=1e-12, atol=1e-12)
    # Gradients: task and domain parts separately, so the reversal's sign and scale show.
    g_task = torch.autograd.grad(task, [hand["h"], hand["W"], hand["b"]], retain_graph=True)
    g_dom = torch.autograd.grad(dom, [hand["h"], hand["Wd"], hand["bd"]])
    if adversary == "grl":  # the reversed domain gradient
        g_adv = -lam * g_dom[0]
    else:  # +lambda * dL_conf/dh, L_conf = mean_b CE(c_b, uniform) through the head, frozen
        hc = x["h"].clone().requires_grad_()
        conf = 0.0
        for bi in range(B):
            f = (x["m"][bi, :, None] * hc[bi]).sum(0) / x["m"][bi].sum()
            c = x["Wd"] @ f + x["bd"]
            conf = conf + (torch.logsumexp(c, 0) - c.mean()) / B
        g_adv = lam * torch.autograd.grad(conf, hc)[0]
    torch.testing.assert_close(leaves["h"].grad, g_task[0] + g_adv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaves["W"].grad, g_task[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaves["b"].grad, g_task[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaves["Wd"].grad, g_dom[1], rtol=1e-10, atol=1e-12)  # not reversed
    torch.testing.assert_close(leaves["bd"].grad, g_dom[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_normaliser_under_gradient_accumulation(impl):
    """Two micro-batches with n = the valid tokens of both give the full batch's task loss
    and gradients."""
    x = inputs(7)
    n_total = int((x["y"] != -100).sum())
    W = x["W"].clone().requires_grad_()
    full, _ = prada_loss(x["h"], W, x["y"], teacher_hidden=x["u"], teacher_weight=x["Wt"], impl=impl)
    full.backward()
    g_full = W.grad.clone()
    W.grad = None
    total = 0.0
    for s in (slice(0, 1), slice(1, 3)):
        part, _ = prada_loss(x["h"][s], W, x["y"][s], teacher_hidden=x["u"][s],
                             teacher_weight=x["Wt"], num_valid_tokens=n_total, impl=impl)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W.grad, g_full, rtol=1e-10, atol=1e-12)


def test_alpha_ignored_without_teacher_and_parts():
    x = inputs(3)
    loss, parts = prada_loss(x["h"], x["W"], x["y"], alpha=0.2, impl="reference")
    torch.testing.assert_close(loss, parts["ce"])
    assert parts["kd"] == 0 and parts["dom"] == 0


def test_all_ignored_batch_has_finite_zero_task_loss():
    x = inputs(4)
    y = torch.full_like(x["y"], -100)
    h = x["h"].clone().requires_grad_()
    loss, parts = prada_loss(h, x["W"], y, teacher_hidden=x["u"], teacher_weight=x["Wt"],
                             domain_weight=x["Wd"], domain_labels=x["d"], impl="reference")
    assert torch.isfinite(loss) and parts["ce"] == 0 and parts["kd"] == 0 and parts["dom"] > 0
    loss.backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0  # the domain term still acts


def test_grad_reverse_sign_and_scale():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64)
    (grad_reverse(x, 0.37) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.37 * w)


def test_lambda_schedules():
    assert dann_lambda(0, 100) == 0.0
    for step in (1, 13, 50, 99):
        p = step / 100
        assert math.isclose(dann_lambda(step, 100, 0.8, 10.0), 0.8 * (2 / (1 + math.exp(-10 * p)) - 1))
    assert math.isclose(lambda_at("dann", 100, 100), 2 / (1 + math.exp(-10)) - 1)
    assert lambda_at("constant", 3, 100, 0.25) == 0.25
    with pytest.raises(ValueError):
        lambda_at("linear", 1, 10)


def test_bad_arguments_name_the_argument():
    x = inputs(5)
    with pytest.raises(ValueError, match="teacher_weight"):
        prada_loss(x["h"], x["W"], x["y"], teacher_hidden=x["u"], teacher_weight=x["Wt"][:-1])
    with pytest.raises(ValueError, match="domain_labels"):
        prada_loss(x["h"], x["W"], x["y"], domain_weight=x["Wd"])
    with pytest.raises(ValueError, match="impl"):
        prada_loss(x["h"], x["W"], x["y"], impl="cuda")


def test_keywords_are_one_options_object():
    """prada_loss's keyword arguments are LossOptions' fields (plus impl), one definition; a
    misspelt keyword is named in the error, a bad value names its argument."""
    import inspect
    from dataclasses import fields

    from prada_fast import LossOptions

    params = inspect.signature(prada_loss).parameters
    assert list(params)[:3] == ["hidden", "lm_weight", "targets"]
    assert list(params)[3:] == [f.name for f in fields(LossOptions)] + ["impl"]
    h, w, y = torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="tempreature"):
        prada_loss(h, w, y, tempreature=2.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        prada_loss(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        prada_loss(h, w, y, impl="fast")


def packed_inputs(seed):
    """inputs() with the rows packed: row 0 one sequence then a -1, row 1 short sequences with
    a -1 between, row 2 two sequences, the second of which has an empty pool mask; S = 6."""
    x = inputs(seed)
    x["seq"] = torch.tensor([[0, 0, 0, 0, 0, 0, -1],
                             [1, 2, 2, -1, 3, 3, 3],
                             [4, 4, 4, 4, 5, 5, 5]])
    x["m"][:, [0, 1, 4]] = 1
    x["m"][2, 4:] = 0  # sequence 5 pools to 0
    x["d"] = torch.randint(0, D, (6,), generator=torch.Generator().manual_seed(seed))
    return x


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
def test_reference_packed_rows_match_hand_computation(adversary, seed):
    """seq_index: one pooled feature per sequence (its masked mean; -1 positions excluded; an
    empty pool pools to 0), L_dom, L_conf and dom_acc as means over the S sequences."""
    x = packed_inputs(seed)
    lam = 0.6
    S = len(x["d"])
    leaves = {k: x[k].clone().requires_grad_() for k in ("h", "Wd", "bd")}
    none = torch.full_like(x["y"], -100)  # no task term: the domain term alone
    loss, parts = prada_loss(leaves["h"], x["W"], none, pool_mask=x["m"], seq_index=x["seq"],
                             domain_weight=leaves["Wd"], domain_bias=leaves["bd"], domain_labels=x["d"],
                             adv_lambda=lam, adversary=adversary, impl="reference")
    loss.backward()

    h = x["h"].clone().requires_grad_()
    Wd, bd = x["Wd"].clone().requires_grad_(), x["bd"].clone().requires_grad_()
    dom = conf = 0.0
    hits = 0
    for s in range(S):
        w = ((x["seq"] == s).double() * x["m"])[..., None]
        f = (w * h).sum((0, 1)) / w.sum().clamp_min(1)
        if s == 5:
            assert w.sum() == 0  # the empty pool: f = 0
        c = Wd @ f + bd
        dom = dom + (torch.logsumexp(c, 0) - c[x["d"][s]]) / S
        c_frozen = x["Wd"] @ f + x["bd"]
        conf = conf + (torch.logsumexp(c_frozen, 0) - c_frozen.mean()) / S
        hits += int(c.argmax() == x["d"][s])
    torch.testing.assert_close(loss.detach(), dom.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["dom"], dom.detach(), rtol=1e-12, atol=1e-12)
    assert parts["dom_acc"].item() == pytest.approx(hits / S)
    g_dom = torch.autograd.grad(dom, [h, Wd, bd], retain_graph=True)
    g_adv = -lam * g_dom[0] if adversary == "grl" else lam * torch.autograd.grad(conf, h)[0]
    torch.testing.assert_close(leaves["h"].grad, g_adv, rtol=1e-10, atol=1e-12)
    assert (leaves["h"].grad[x["seq"] < 0] == 0).all()  # -1 positions: no domain gradient
    torch.testing.assert_close(leaves["Wd"].grad, g_dom[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(leaves["bd"].grad, g_dom[2], rtol=1e-10, atol=1e-12)


def test_masked_mean_per_sequence():
    """The pooling helper that the MLP head uses (prada_fast.op.masked_mean) with seq_index,
    under a GRL: the MLP head's domain term over packed rows equals the same term over the rows
    unpacked into one sequence per row (values and gradients mapped back)."""
    from prada_fast.op import masked_mean

    x = packed_inputs(3)
    S = len(x["d"])
    # unpacked: sequence s alone in row s, at its original positions' values, padded with 0
    pos = [(x["seq"] == s).nonzero() for s in range(S)]
    L = max(len(p) for p in pos)
    h_un = torch.zeros(S, L, H, dtype=torch.float64)
    m_un = torch.zeros(S, L, dtype=torch.float64)
    for s, p in enumerate(pos):
        h_un[s, : len(p)] = x["h"][p[:, 0], p[:, 1]]
        m_un[s, : len(p)] = x["m"][p[:, 0], p[:, 1]]
    inner = torch.nn.Linear(H, 8, dtype=torch.float64)
    out = torch.nn.Linear(8, D, dtype=torch.float64)

    def mlp_dom(f):
        c = out(torch.relu(inner(grad_reverse(f, 0.5))))
        return torch.nn.functional.cross_entropy(c, x["d"])

    hp = x["h"].clone().requires_grad_()
    fp = masked_mean(hp, x["m"], x["seq"], S)
    hu = h_un.clone().requires_grad_()
    fu = masked_mean(hu, m_un)
    assert fp.shape == (S, H) and fp.dtype == torch.float64
    torch.testing.assert_close(fp, fu, rtol=1e-12, atol=1e-12)
    assert (fp[5] == 0).all()  # the empty pool
    torch.testing.assert_close(masked_mean(x["h"], x["m"], x["seq"]), fp.detach())  # S from seq_index
    mlp_dom(fp).backward()
    mlp_dom(fu).backward()
    for s, p in enumerate(pos):
        torch.testing.assert_close(hp.grad[p[:, 0], p[:, 1]], hu.grad[s, : len(p)], rtol=1e-12, atol=1e-12)
    assert (hp.grad[x["seq"] < 0] == 0).all()
    # bf16 hidden: sums in fp32, the features in bf16
    fb = masked_mean(x["h"].bfloat16(), x["m"], x["seq"], S)
    assert fb.dtype == torch.bfloat16
    torch.testing.assert_close(fb.double(), fp.detach(), rtol=2e-2, atol=2e-2)


def test_seq_index_argument_checks():
    x = packed_inputs(5)
    h, W, y = x["h"], x["W"], x["y"]
    kw = dict(domain_weight=x["Wd"], domain_labels=x["d"])
    with pytest.raises(ValueError, match=r"seq_index must be \(3, 7\)"):
        prada_loss(h, W, y, seq_index=x["seq"][:, :-1], **kw)
    with pytest.raises(ValueError, match="seq_index must be int64"):
        prada_loss(h, W, y, seq_index=x["seq"].int(), **kw)
    with pytest.raises(ValueError, match=r"seq_index values must be in \[-1, 6\)"):
        prada_loss(h, W, y, seq_index=torch.where(x["seq"] == 5, 6, x["seq"]), **kw)
    with pytest.raises(ValueError, match=r"seq_index values must be in \[-1, 6\)"):
        prada_loss(h, W, y, seq_index=torch.where(x["seq"] < 0, -2, x["seq"]), **kw)
    with pytest.raises(ValueError, match=r"domain_labels must be \(S,\)"):
        prada_loss(h, W, y, seq_index=x["seq"], domain_weight=x["Wd"], domain_labels=x["d"][None])
    with pytest.raises(ValueError, match=r"domain_labels must be \(3,\)"):  # unpacked: one per row
        prada_loss(h, W, y, **kw)
    # S = len(domain_labels): a sequence number may go unused (it pools to 0)
    loss, _ = prada_loss(h, W, y, seq_index=torch.where(x["seq"] == 5, 4, x["seq"]), impl="reference",
                         **kw)
    assert torch.isfinite(loss)
    # without a domain head seq_index changes nothing
    a, _ = prada_loss(h, W, y, seq_index=x["seq"], impl="reference")
    b, _ = prada_loss(h, W, y, impl="reference")
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------- the teacher as top-K log-probabilities
def hand_topk_task(h, W, b, y, ids, q, tau, alpha):
    """L_task with a top-K teacher in float64, token by token, as a KL between two K + 1 bucket
    distributions: the teacher's (exp(q_1..q_K), r_t = 1 - sum exp(q)) and the student's
    (p_s^tau at the K ids, r_s = 1 - their sum), times tau^2 (docs/design.md)."""
    ce_sum = kd_sum = 0.0
    valid = 0
    for bi in range(h.shape[0]):
        for t in range(h.shape[1]):
            if y[bi, t] == -100:
                continue
            valid += 1
            z = W @ h[bi, t] + b
            ce_sum = ce_sum + torch.logsumexp(z, 0) - z[y[bi, t]]
            p_s = torch.softmax(z / tau, 0)[ids[bi, t]]
            p_t = q[bi, t].exp()
            P = torch.cat([p_s, (1 - p_s.sum()).reshape(1)])
            Q = torch.cat([p_t, (1 - p_t.sum()).reshape(1)])
            kd_sum = kd_sum + tau**2 * (Q * (Q.log() - P.log())).sum()
    return (alpha * ce_sum + (1 - alpha) * kd_sum) / max(valid, 1)


def topk_of(logits, K, tau):
    """The top-K ids and log-probabilities at tau of teacher logits (B, T, V), float64."""
    q, ids = torch.log_softmax(logits / tau, -1).topk(K, -1)
    return ids, q


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
def test_reference_topk_matches_hand_computation(adversary, seed):
    """The reference's top-K KD against the two-bucket-distribution KL written by hand, loss
    and gradients (hidden, lm_weight, lm_bias), with a domain head."""
    x = inputs(seed)
    tau, alpha, K = 1.7, 0.3, 5
    ids, q = topk_of(torch.einsum("btk,vk->btv", x["u"], x["Wt"]), K, tau)
    leaves = {k: x[k].clone().requires_grad_() for k in ("h", "W", "b")}
    loss, parts = prada_loss(leaves["h"], leaves["W"], x["y"], lm_bias=leaves["b"], teacher_topk_ids=ids,
                             teacher_topk_logprobs=q, temperature=tau, alpha=alpha, pool_mask=x["m"],
                             domain_weight=x["Wd"], domain_bias=x["bd"], domain_labels=x["d"],
                             adversary=adversary, impl="reference")
    _, parts_no_dom = prada_loss(x["h"], x["W"], x["y"], lm_bias=x["b"], teacher_topk_ids=ids,
                                 teacher_topk_logprobs=q, temperature=tau, alpha=alpha, impl="reference")
    hand = {k: x[k].clone().requires_grad_() for k in ("h", "W", "b")}
    task = hand_topk_task(hand["h"], hand["W"], hand["b"], x["y"], ids, q, tau, alpha)
    torch.testing.assert_close(loss.detach() - parts["dom"], task.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts["kd"], parts_no_dom["kd"])
    assert torch.isfinite(parts["kd"]) and parts["kd"] > 0
    task.backward()
    h_no_dom = x["h"].clone().requires_grad_()
    W2, b2 = x["W"].clone().requires_grad_(), x["b"].clone().requires_grad_()
    l2, _ = prada_loss(h_no_dom, W2, x["y"], lm_bias=b2, teacher_topk_ids=ids, teacher_topk_logprobs=q,
                       temperature=tau, alpha=alpha, impl="reference")
    l2.backward()
    torch.testing.assert_close(h_no_dom.grad, hand["h"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(W2.grad, hand["W"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b2.grad, hand["b"].grad, rtol=1e-10, atol=1e-12)
    loss.backward()  # with the domain term: W and b see the task term alone
    torch.testing.assert_close(leaves["W"].grad, hand["W"].grad, rtol=1e-10, atol=1e-12)


def test_reference_topk_bounds_and_limits(seed):
    """K = V is the full KD (ids in any order); a smaller K gives at most the full KD (the
    buckets merge ids: KL can only shrink), and more ids give more of it."""
    x = inputs(seed)
    tau = 2.0
    z_t = torch.einsum("btk,vk->btv", x["u"], x["Wt"])
    common = dict(temperature=tau, alpha=0.0, impl="reference")
    _, full = prada_loss(x["h"], x["W"], x["y"], teacher_logits=z_t, **common)
    ids, q = topk_of(z_t, V, tau)
    perm = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    _, every = prada_loss(x["h"], x["W"], x["y"], teacher_topk_ids=ids.gather(-1, perm),
                          teacher_topk_logprobs=q.gather(-1, perm), **common)
    torch.testing.assert_close(every["kd"], full["kd"], rtol=1e-12, atol=1e-12)
    kds = [prada_loss(x["h"], x["W"], x["y"], teacher_topk_ids=ids[..., :k], teacher_topk_logprobs=q[..., :k],
                      **common)[1]["kd"] for k in (1, 4, 11, V - 1)]
    assert all(a <= b + 1e-12 for a, b in zip(kds, kds[1:] + [full["kd"]])), kds


def test_reference_topk_tail_of_1e7(seed):
    """A top-K holding all but r_t ~ 1e-7 of the teacher's mass, and a student whose tail is
    ~1e-10: the float64 reference equals the hand KL of the two bucket distributions (whose
    1 - sum is exact enough in float64), and so does its float32 run to 1e-6. The student's
    logits are given directly: hidden = z with an identity head (H = V)."""
    y = inputs(seed)["y"]
    tau, K = 1.0, 6
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    p = torch.rand(B, T, K, generator=g, dtype=torch.float64) + 0.1
    r_t = 1e-7 * (1 + torch.rand(B, T, 1, generator=g, dtype=torch.float64))
    q = (p / p.sum(-1, keepdim=True) * (1 - r_t)).log()
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) - 25.0  # -25 outside the K ids
    z.scatter_add_(2, ids, torch.full(ids.shape, 25.0, dtype=torch.float64))
    W = torch.eye(V, dtype=torch.float64)
    kw = dict(teacher_topk_ids=ids, temperature=tau, alpha=0.0, impl="reference")
    loss, _ = prada_loss(z, W, y, teacher_topk_logprobs=q, **kw)
    task = hand_topk_task(z, W, torch.zeros(V, dtype=torch.float64), y, ids, q, tau, 0.0)
    torch.testing.assert_close(loss, task, rtol=1e-9, atol=0)
    loss32, _ = prada_loss(z.float(), W.float(), y, teacher_topk_logprobs=q.float(), **kw)
    assert abs(loss32.item() - task.item()) <= 1e-6 * task.item()


def test_topk_argument_checks():
    x = inputs(5)
    h, W, y = x["h"], x["W"], x["y"]
    ids, q = topk_of(torch.randn(B, T, V, dtype=torch.float64), 4, 1.0)
    with pytest.raises(ValueError, match="go together"):
        prada_loss(h, W, y, teacher_topk_ids=ids)
    with pytest.raises(ValueError, match="go together"):
        prada_loss(h, W, y, teacher_topk_logprobs=q)
    with pytest.raises(ValueError, match="in one form"):
        prada_loss(h, W, y, teacher_topk_ids=ids, teacher_topk_logprobs=q, teacher_hidden=x["u"],
                   teacher_weight=x["Wt"])
    with pytest.raises(ValueError, match="in one form"):
        prada_loss(h, W, y, teacher_topk_ids=ids, teacher_topk_logprobs=q,
                   teacher_logits=torch.zeros(B, T, V, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be \(3, 7, K\)"):
        prada_loss(h, W, y, teacher_topk_ids=ids[:, :, 0], teacher_topk_logprobs=q)
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs must be \(3, 7, 4\)"):
        prada_loss(h, W, y, teacher_topk_ids=ids, teacher_topk_logprobs=q[..., :3])
    with pytest.raises(ValueError, match="int64"):
        prada_loss(h, W, y, teacher_topk_ids=ids.int(), teacher_topk_logprobs=q)
    with pytest.raises(ValueError, match="floating point"):
        prada_loss(h, W, y, teacher_topk_ids=ids, teacher_topk_logprobs=ids)
    wide = torch.arange(V + 1).expand(B, T, V + 1)
    with pytest.raises(ValueError, match=r"K = 24 ids per position, expected 1 <= K <= V = 23"):
        prada_loss(h, W, y, teacher_topk_ids=wide, teacher_topk_logprobs=wide.double())
    with pytest.raises(ValueError, match="K = 0"):
        prada_loss(h, W, y, teacher_topk_ids=ids[..., :0], teacher_topk_logprobs=q[..., :0])
    b, t = (y != -100).nonzero()[0].tolist()
    for bad, what in ((V, r"\[0, 23\)"), (-1, r"\[0, 23\)")):
        ids_bad = ids.clone()
        ids_bad[b, t, 1] = bad
        with pytest.raises(ValueError, match=what):
            prada_loss(h, W, y, teacher_topk_ids=ids_bad, teacher_topk_logprobs=q)
    ids_dup = ids.clone()
    ids_dup[b, t, 2] = ids_dup[b, t, 0]
    with pytest.raises(ValueError, match="distinct"):
        prada_loss(h, W, y, teacher_topk_ids=ids_dup, teacher_topk_logprobs=q)
    # rows without a target are not read: anything goes there
    junk = torch.where((y == -100)[..., None], -5, ids)
    loss, parts = prada_loss(h, W, y, teacher_topk_ids=junk, teacher_topk_logprobs=q, impl="reference")
    ref, _ = prada_loss(h, W, y, teacher_topk_ids=ids, teacher_topk_logprobs=q, impl="reference")
    torch.testing.assert_close(loss, ref)


def test_grl_lambda_is_a_deprecated_name_of_adv_lambda():
    """prada_loss and PradaLoss still accept grl_lambda= (a DeprecationWarning), as adv_lambda."""
    from prada_fast import PradaLoss
    x = inputs(3)
    kw = dict(domain_weight=x["Wd"], domain_bias=x["bd"], domain_labels=x["d"], impl="reference")

    def grad_h(**lam):
        h = x["h"].clone().requires_grad_()
        prada_loss(h, x["W"], x["y"], **lam, **kw)[0].backward()
        return h.grad
    want = grad_h(adv_lambda=0.3)
    with pytest.warns(DeprecationWarning, match="grl_lambda"):
        got = grad_h(grl_lambda=0.3)
    assert torch.equal(got, want) and not torch.equal(got, grad_h(adv_lambda=0.6))
    with pytest.warns(DeprecationWarning):
        mod = PradaLoss(grl_lambda=0.1)
    with pytest.warns(DeprecationWarning):
        mod.set(grl_lambda=0.3)
    assert mod.options.adv_lambda == 0.3 == mod.options.grl_lambda
    with pytest.raises(TypeError, match="adv_lambda alone"):
        grad_h(grl_lambda=0.3, adv_lambda=0.3)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_kd_in_fp32_at_a_real_vocabulary(seed, tau):
    """fp32 at V = 49152 and logits of a real model's spread (~20): the chunked op's KD and
    CE within 1e-6 of float64 (a mat-vec over the vocabulary gave ~1e-4, issue 27)."""
    g = torch.Generator().manual_seed(seed)
    N, H, Vr = 37, 24, 49152
    h = torch.randn(N, H, generator=g) * 2
    W = torch.randn(Vr, H, generator=g) * 1.5 - 0.3
    u = torch.randn(N, H, generator=g) * 2
    Wt = W + 0.3 * torch.randn(Vr, H, generator=g)
    y = torch.randint(0, Vr, (N,), generator=g)
    y[5] = -100
    kw = dict(teacher_hidden=u[None], teacher_weight=Wt, temperature=tau, alpha=0.0)
    _, p32 = prada_loss(h[None], W, y[None], impl="chunked", **kw)
    _, p64 = prada_loss(h[None].double(), W.double(), y[None], impl="reference",
                        **{**kw, "teacher_hidden": u[None].double(), "teacher_weight": Wt.double()})
    for part in ("kd", "ce"):
        assert abs(float(p32[part]) - float(p64[part])) <= 1e-6 * abs(float(p64[part])), part
