"""Parity tests of the Triton kernels (prada_kernels) and the chunked op against the float64
reference, plus direct tests of the row and domain ops against their PyTorch twins.

Without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be set
before triton (or prada_kernels) is imported, so it is done here, first thing. The kernels
are never skipped: on CPU they run interpreted (slowly, so the shapes are small).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from prada_fast import PradaLoss, prada_loss  # noqa: E402
from prada_fast.op.testing import GRAD_NAMES, random_inputs, rel_err, tolerance  # noqa: E402
from prada_fast.op.torch_backend import torch_domain, torch_rows  # noqa: E402
from prada_kernels.fused_linear_distill import triton_rows  # noqa: E402
from prada_kernels.domain_head import triton_domain_head  # noqa: E402
from prada_kernels.runtime import interpreting  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_kernels_really_run():
    """The kernels run here: compiled on CUDA, interpreted on CPU, never skipped."""
    assert DEV.type == "cuda" or interpreting()
    assert DEV.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def assert_close(x, ref, tol, what):
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"  # NaN fails too


HYPER = {"temperature": 2.0, "alpha": 0.3, "adv_lambda": 0.7}


def make_batch(seed, *, B=3, T=13, H=40, V=517, D=3, Ht=56, K=37, dtype=torch.float32, teacher="none",
               bias=False, domain=False, pool_mask=False, ignore_frac=0.3, packed=False):
    """Random inputs at odd sizes (prada_fast.op.testing.random_inputs) on DEV; with a pool
    mask, the last row's is empty (it pools to 0). packed: several sequences per row
    (seq_index; one of them with an empty pool mask instead of the last row). teacher: "none",
    "hidden", "logits" or "topk" (K ids per position, log-probabilities at HYPER's temperature)."""
    return random_inputs(B=B, T=T, H=H, V=V, Ht=Ht if teacher == "hidden" else 0,
                         teacher_logits=teacher == "logits", D=D if domain else 0, dtype=dtype,
                         bias=bias, ignore_frac=ignore_frac, pool_mask=pool_mask,
                         empty_pool_row=pool_mask and B > 2, seed=seed, device=DEV, packed=packed,
                         topk=K if teacher == "topk" else 0, tau=HYPER["temperature"])


def run(x, impl, upcast=False, **kw):
    """(loss, parts, grads dict) of prada_loss on the inputs x (float64 copies if upcast)."""
    args = {}
    for k, v in x.items():
        if upcast and v.is_floating_point():
            v = v.detach().to(torch.float64).requires_grad_(v.requires_grad)
        else:
            v = v.detach().requires_grad_(v.requires_grad) if v.is_floating_point() else v
        args[k] = v
    opts = {**HYPER, **kw}
    loss, parts = _call(args, impl, opts)
    loss.backward()
    grads = {k: args[k].grad for k in GRAD_NAMES if k in args}
    return loss, parts, grads, args


def _call(args, impl, opts):
    a = dict(args)
    return prada_loss(a.pop("hidden"), a.pop("lm_weight"), a.pop("targets"), impl=impl, **a,
                      **opts)


def check_against_reference(x, impl, dtype, **kw):
    loss_r, parts_r, grads_r, _ = run(x, "reference", upcast=True, **kw)
    loss, parts, grads, args = run(x, impl, **kw)
    tol = {w: tolerance(dtype, w) for w in ("loss", "grad")}
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_r, tol["loss"], "loss")
    for k in ("ce", "kd", "dom"):
        assert_close(parts[k], parts_r[k], tol["loss"], k)
    assert parts["dom_acc"].item() == pytest.approx(parts_r["dom_acc"].item(), abs=1e-6)
    assert int(parts["n_tokens"]) == int(parts_r["n_tokens"])
    assert set(grads) == set(grads_r)
    for k, g in grads.items():
        assert g is not None, f"no gradient for {k}"
        assert g.dtype == x[k].dtype and g.shape == x[k].shape, k
        assert_close(g, grads_r[k], tol["grad"], f"grad {k}")
    return loss, parts, grads, args


CONFIGS = {  # (lm_bias, domain head, pool mask)
    "plain": dict(bias=False, domain=False, pool_mask=False),
    "bias_domain": dict(bias=True, domain=True, pool_mask=False),
    "full": dict(bias=True, domain=True, pool_mask=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("teacher", ["none", "hidden", "logits", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_parity_with_reference(impl, dtype, teacher, config, seed):
    x = make_batch(seed, dtype=dtype, teacher=teacher, **CONFIGS[config])
    check_against_reference(x, impl, dtype)


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_parity_confusion_adversary(impl, dtype, teacher, seed):
    """adversary="confusion": odd sizes, a teacher, a bias, a random pool mask with an empty
    row, against the float64 reference; and the head's gradients equal the GRL run's (the
    head learns from L_dom under either adversary) while hidden's differ."""
    x = make_batch(seed, dtype=dtype, teacher=teacher, bias=True, domain=True, pool_mask=True, D=5)
    _, _, grads, _ = check_against_reference(x, impl, dtype, adversary="confusion")
    _, _, grads_grl, _ = run(x, impl, adversary="grl")
    for k in ("domain_weight", "domain_bias", "lm_weight"):
        torch.testing.assert_close(grads[k], grads_grl[k])
    assert not torch.allclose(grads["hidden"], grads_grl["hidden"])


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_parity_packed_rows(impl, dtype, adversary, seed):
    """seq_index (packed rows) against the float64 reference at odd sizes (V = 2 tiles + 5):
    row 0 holds one sequence and -1 padding, row 1 many short sequences (lengths 1-3) with -1
    gaps, rows 2-3 random ones; -1 positions with pool mask 1 (they must not pool); one
    sequence with an empty pool mask (it pools to 0); a teacher, a bias, D = 5; chunks of 7."""
    x = make_batch(seed, B=4, V=261, dtype=dtype, teacher="hidden", bias=True, domain=True,
                   pool_mask=True, D=5, packed=True)
    seq, m = x["seq_index"], x["pool_mask"]
    S = len(x["domain_labels"])
    assert (seq[0, :-2] == 0).all() and (seq[0, -2:] == -1).all()  # one sequence
    assert len(seq[1][seq[1] >= 0].unique()) >= 4  # many short ones
    assert ((seq == -1) & (m != 0)).any()
    empty = [s for s in range(S) if not ((seq == s) & (m != 0)).any()]
    assert len(empty) == 1 and (seq == empty[0]).any()
    _, parts, grads, _ = check_against_reference(x, impl, dtype, adversary=adversary, chunk_rows=7)
    g_dom = grads["hidden"][(x["targets"] == -100) & (seq == -1)]
    assert (g_dom == 0).all()  # no task, no sequence: no gradient


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_parity_packed_rows_all_ignored(impl, seed):
    """Packed rows of target-domain sequences only (every target ignored): the domain term
    alone, per sequence, fp32, GRL."""
    x = make_batch(seed, B=3, T=11, teacher="logits", domain=True, pool_mask=True, ignore_frac=1.0,
                   packed=True)
    loss, parts, grads, _ = check_against_reference(x, impl, torch.float32)
    assert parts["dom"] > 0 and grads["hidden"].abs().sum() > 0


def pack_rows(x, T_packed):
    """The rows of a padded batch x (one sequence per row: its positions with a nonzero
    pool mask or a target, then padding) packed first-fit into rows of T_packed positions,
    sequence b keeping its number b (so domain_labels stay): (packed inputs, where) with
    where[b] = (row, start) of sequence b."""
    B, T, H = x["hidden"].shape
    real = (x["pool_mask"] != 0) | (x["targets"] != -100)
    lengths = [int(r.nonzero().max()) + 1 if r.any() else 1 for r in real]
    rows, where = [], []
    for n in lengths:
        for i, used in enumerate(rows):
            if used + n <= T_packed:
                where.append((i, used))
                rows[i] += n
                break
        else:
            where.append((len(rows), 0))
            rows.append(n)
    R = len(rows)
    y = {}
    for k, v in x.items():
        if k in ("hidden", "teacher_hidden", "teacher_logits"):
            y[k] = torch.randn(R, T_packed, v.shape[-1], device=DEV).to(v.dtype)  # padding: noise
        elif k == "targets":
            y[k] = torch.full((R, T_packed), -100, dtype=v.dtype, device=DEV)
        elif k == "pool_mask":
            y[k] = torch.ones(R, T_packed, dtype=v.dtype, device=DEV)  # padding: mask 1, seq -1
        else:
            y[k] = v
    y["seq_index"] = torch.full((R, T_packed), -1, dtype=torch.int64, device=DEV)
    for b, ((r, s), n) in enumerate(zip(where, lengths)):
        for k in ("hidden", "teacher_hidden", "teacher_logits", "targets", "pool_mask"):
            if k in x:
                y[k][r, s: s + n] = x[k][b, :n]
        y["seq_index"][r, s: s + n] = b
    for k in GRAD_NAMES:
        if k in y:
            y[k] = y[k].detach().requires_grad_(True)
    return y, where, lengths


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_packing_equals_unpacked_batch(impl, adversary, seed):
    """A padded batch (one sequence per row, random lengths) and the same sequences packed
    into fewer rows with seq_index give the same loss, parts and gradients, the hidden
    gradient mapped back position by position; the packed rows' padding gets none."""
    B, T = 6, 15
    x = make_batch(seed, B=B, T=T, V=261, teacher="hidden", bias=True, domain=True, pool_mask=True,
                   D=4, ignore_frac=0.0)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(2, 6, (B,), generator=g)  # the question (pooled, no target) ...
    n = q + torch.randint(0, T - 5, (B,), generator=g)  # ... then targets up to length n
    n[2] = q[2]  # a target-domain sequence: the question alone
    ar = torch.arange(T)
    with torch.no_grad():
        x["pool_mask"].copy_((ar < q[:, None]).to(x["pool_mask"].dtype))
        x["pool_mask"][4] = 0  # a sequence whose pool is empty: it pools to 0
        x["targets"][(ar < q[:, None]) | (ar >= n[:, None])] = -100
    y, where, lengths = pack_rows(x, T_packed=2 * T - 3)
    assert y["seq_index"].shape[0] < B and (y["seq_index"] == -1).any()
    assert any(len(y["seq_index"][r].unique()) > 2 for r in range(y["seq_index"].shape[0]))
    loss_u, parts_u, grads_u, _ = run(x, impl, adversary=adversary)
    loss_p, parts_p, grads_p, _ = run(y, impl, adversary=adversary)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for k in ("ce", "kd", "dom", "dom_acc", "n_tokens"):
        torch.testing.assert_close(parts_p[k], parts_u[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ("lm_weight", "lm_bias", "domain_weight", "domain_bias"):
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-4, atol=1e-6, msg=k)
    mapped = torch.zeros_like(grads_u["hidden"])
    for b, ((r, s), n_b) in enumerate(zip(where, lengths)):
        mapped[b, :n_b] = grads_p["hidden"][r, s: s + n_b]
    torch.testing.assert_close(mapped, grads_u["hidden"], rtol=1e-4, atol=1e-7)
    assert (grads_p["hidden"][y["seq_index"] == -1] == 0).all()


@pytest.mark.parametrize("V", [100, 261], ids=["V<block", "V=2*block+5"])
def test_parity_vocab_vs_block(V, seed):
    x = make_batch(seed, V=V, teacher="logits", bias=True, domain=True, pool_mask=True)
    check_against_reference(x, "triton", torch.float32)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_several_chunks(impl, seed):
    """chunk_rows=7 over the ~27 valid rows of N=39: several chunks (the last one partial
    unless the count is a multiple of 7)."""
    x = make_batch(seed, teacher="hidden", bias=True, domain=True, pool_mask=True)
    n_valid = int((x["targets"] != -100).sum())
    assert n_valid > 14, f"{n_valid} valid rows: fewer chunks than meant"
    check_against_reference(x, impl, torch.float32, chunk_rows=7)


@pytest.mark.parametrize("chunk_rows", [16, 2], ids=["3_chunks_bf16_grad_W", "20_chunks_fp32_grad_W"])
def test_bf16_grad_w_accumulation_over_chunks(chunk_rows, seed):
    """bf16 inputs: grad_W adds up in bf16 over few chunks, in an fp32 accumulator over many
    (prada_fast.op.driver.LOW_PRECISION_GRAD_W_CHUNKS); both within the bf16 tolerance."""
    from prada_fast.op.driver import LOW_PRECISION_GRAD_W_CHUNKS

    x = make_batch(seed, dtype=torch.bfloat16, teacher="hidden", bias=True, domain=True, ignore_frac=0.0)
    n_chunks = -(-39 // chunk_rows)
    assert (n_chunks <= LOW_PRECISION_GRAD_W_CHUNKS) == (chunk_rows == 16)
    check_against_reference(x, "triton", torch.bfloat16, chunk_rows=chunk_rows)


def test_gpu_chunk_rows_rule():
    """Chunks of the GPU path: the most rows whose logit buffers fit 1 GiB, in 256-row steps."""
    from prada_kernels.fused_linear_distill import triton_chunk_rows

    assert triton_chunk_rows(8192, 128256) == 2048            # 2 x 2048 x 128256 x 2 B = 1.0 GiB
    assert triton_chunk_rows(65536, 262144) == 1024
    assert triton_chunk_rows(65536, 151936, n_buffers=1) == 3328
    assert triton_chunk_rows(100_000, 32000) == 8192          # capped
    assert triton_chunk_rows(100_000, 4_000_000) == 256       # floored
    assert triton_chunk_rows(300, 128256) == 300              # one chunk of every row
    for V in (1003, 32000, 50257, 128256, 151936, 262144):
        for nb in (1, 2):
            c = triton_chunk_rows(10**6, V, n_buffers=nb)
            assert c % 256 == 0 and (c == 256 or c * nb * V * 2 <= 1 << 30)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_gradient_scales_with_incoming_gradient(impl, seed):
    x = make_batch(seed, teacher="hidden", bias=True, domain=True)
    _, _, g1, _ = run(x, impl)
    args = {k: (v.detach().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in x.items()}
    loss, _ = _call(args, impl, HYPER)
    (2.5 * loss).backward()
    for k in GRAD_NAMES:
        torch.testing.assert_close(args[k].grad, 2.5 * g1[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_num_valid_tokens_gradient_accumulation(impl, seed):
    """Two half-batches normalised by the whole batch's token count sum to the full batch."""
    x = make_batch(seed, B=4, T=9, teacher="logits", bias=True)
    n = int((x["targets"] != -100).sum())
    loss_f, parts_f, grads_f, _ = run(x, impl, num_valid_tokens=n)
    loss_full_default, _, _, _ = run(x, impl)  # the default normaliser is the same n here
    torch.testing.assert_close(loss_f, loss_full_default)
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        xh = {k: (v[sl] if k in ("hidden", "targets", "teacher_logits") else v)
              for k, v in x.items()}
        xh = {k: (v.detach().requires_grad_(x[k].requires_grad) if v.is_floating_point() else v)
              for k, v in xh.items()}
        halves.append(run(xh, impl, num_valid_tokens=n))
    torch.testing.assert_close(halves[0][0] + halves[1][0], loss_f, rtol=1e-5, atol=1e-6)
    for k in ("ce", "kd"):
        torch.testing.assert_close(halves[0][1][k] + halves[1][1][k], parts_f[k],
                                   rtol=1e-5, atol=1e-6)
    for k in ("lm_weight", "lm_bias"):
        torch.testing.assert_close(halves[0][2][k] + halves[1][2][k], grads_f[k],
                                   rtol=1e-4, atol=1e-7)
    gh = torch.cat([halves[0][2]["hidden"], halves[1][2]["hidden"]])
    torch.testing.assert_close(gh, grads_f["hidden"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("domain", [True, False], ids=["domain", "no_domain"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_all_targets_ignored(impl, domain, seed):
    """A batch of target-domain rows only: every target ignored. The task term is 0 with zero
    LM gradients; the domain term (and its reversed gradient into hidden) is still there."""
    x = make_batch(seed, teacher="hidden", bias=True, domain=domain, pool_mask=True,
                   ignore_frac=1.0)
    assert (x["targets"] == -100).all()
    loss, parts, grads, _ = check_against_reference(x, impl, torch.float32)
    assert torch.isfinite(loss)
    assert parts["ce"].item() == 0 and parts["kd"].item() == 0
    assert int(parts["n_tokens"]) == 0
    assert (grads["lm_weight"] == 0).all() and (grads["lm_bias"] == 0).all()
    if domain:
        assert parts["dom"].item() > 0 and loss.item() == pytest.approx(parts["dom"].item())
        assert grads["hidden"].abs().sum() > 0
    else:
        assert loss.item() == 0 and (grads["hidden"] == 0).all()


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_teacher_gets_no_gradient(impl, teacher, seed):
    x = make_batch(seed, teacher=teacher)
    for k in ("teacher_hidden", "teacher_weight", "teacher_logits"):
        if k in x:
            x[k].requires_grad_(True)
    _, _, _, args = run(x, impl)
    for k in ("teacher_hidden", "teacher_weight", "teacher_logits"):
        if k in args:
            assert args[k].grad is None, k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings of the interpreter
@pytest.mark.parametrize("where", ["hidden", "teacher_logits"])
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_nan_in_a_valid_row_propagates(impl, where, seed):
    x = make_batch(seed, teacher="logits")
    b, t = [int(i) for i in (x["targets"] != -100).nonzero()[0]]
    with torch.no_grad():
        x[where][b, t, 3] = float("nan")
    args = {k: (v.detach().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in x.items()}
    loss, parts = _call(args, impl, HYPER)
    assert torch.isnan(loss), f"{impl}: NaN input gave a finite loss {loss.item()}"
    assert torch.isnan(parts["ce" if where == "hidden" else "kd"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_packed_nan_outside_every_sequence_stays_out(impl, seed):
    """Packed rows: a NaN at a -1 position (no target) reaches no sequence, whatever its
    pool mask; at a pooled position it makes the domain loss NaN."""
    x = make_batch(seed, B=3, T=11, V=100, domain=True, pool_mask=True, packed=True)
    seq, m = x["seq_index"], x["pool_mask"]
    with torch.no_grad():
        outside = (seq == -1) & (m != 0)
        x["targets"][outside] = -100
        x["hidden"][outside] = float("nan")
    assert outside.any()
    args = {k: (v.detach().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in x.items()}
    loss, parts = _call(args, impl, HYPER)
    assert torch.isfinite(loss) and torch.isfinite(parts["dom"])
    b, t = [int(i) for i in ((seq >= 0) & (m != 0)).nonzero()[0]]
    with torch.no_grad():
        x["targets"][b, t] = -100
        x["hidden"][b, t, 3] = float("nan")
    args = {k: (v.detach().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in x.items()}
    _, parts = _call(args, impl, HYPER)
    assert torch.isnan(parts["dom"])


# ---------------------------------------------------------------- the top-K teacher


def _shuffled(ids, q, seed):
    """The K ids of each position in a random order (the op must not depend on it)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(ids.shape, generator=g).argsort(-1).to(ids.device)
    return ids.gather(-1, perm), q.gather(-1, perm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_topk_of_every_id_is_the_full_kd(impl, dtype, seed):
    """K = V: the top-K path with every id, from the teacher's own logits, gives the full KD
    of those logits (the float64 reference with teacher_logits), loss, parts and gradients;
    the reference in float64 on unrounded log-probabilities to 1e-10."""
    V = 261
    x = make_batch(seed, V=V, dtype=dtype, teacher="logits", bias=True, domain=True, pool_mask=True)
    tau = HYPER["temperature"]
    logp = torch.log_softmax(x["teacher_logits"].double() / tau, -1)
    ids, q = _shuffled(*reversed(logp.topk(V, -1)), seed)
    x_k = {k: v for k, v in x.items() if k != "teacher_logits"}
    loss_f, parts_f, grads_f, _ = run(x, "reference", upcast=True)  # the full KD, float64
    if impl == "reference":
        loss, parts, grads, _ = run({**x_k, "teacher_topk_ids": ids, "teacher_topk_logprobs": q},
                                    "reference", upcast=True)
        tol = {"loss": 1e-10, "grad": 1e-10}
    else:
        loss, parts, grads, _ = run({**x_k, "teacher_topk_ids": ids, "teacher_topk_logprobs": q.to(dtype)},
                                    impl)
        tol = {w: tolerance(dtype, w) for w in ("loss", "grad")}
    assert_close(loss, loss_f, tol["loss"], "loss")
    assert_close(parts["kd"], parts_f["kd"], tol["loss"], "kd")
    for k in grads_f:
        assert_close(grads[k], grads_f[k], tol["grad"], f"grad {k}")


def near_full_mass_batch(seed, dtype, r_t=1e-7, B=3, T=11, V=261, K=41):
    """A batch whose top-K hold nearly all the mass of both distributions: every position's K
    ids are one set S (in its own order), the teacher's tail r_t = 1 - sum p_t is ~r_t (set in
    float64 on the rounded log-probabilities, fp32), and the student's bias puts -40 on the ids
    outside S (not +40 on S: bf16 logits near 40 are 0.25 apart), so its tail r_s is ~1e-8:
    1 - sum p_s(S) would be 0 or negative in fp32."""
    x = make_batch(seed, B=B, T=T, V=V, dtype=dtype, bias=True, domain=True, pool_mask=True)
    g = torch.Generator().manual_seed(seed)
    S = torch.randperm(V, generator=g)[:K]
    with torch.no_grad():
        x["lm_bias"] -= 40.0
        x["lm_bias"][S] += 40.0
    perm = torch.rand(B, T, K, generator=g).argsort(-1)
    ids = S[perm]
    p = torch.exp(2 * torch.randn(B, T, K, generator=g, dtype=torch.float64))
    r = r_t * 10 ** (0.6 * torch.rand(B, T, 1, generator=g, dtype=torch.float64) - 0.3)
    p = p / p.sum(-1, keepdim=True) * (1 - r)
    q = p.log().to(dtype)
    if dtype == torch.float32:  # the smallest probability takes up the rounding of the others
        j = p.argmin(-1, keepdim=True)
        rest = q.double().exp().sum(-1, keepdim=True) - q.double().gather(-1, j).exp()
        q.scatter_(-1, j, (1 - r - rest).log().to(dtype))
    x["teacher_topk_ids"], x["teacher_topk_logprobs"] = ids.to(DEV), q.to(DEV)
    return x, S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_topk_holding_nearly_all_the_mass(impl, dtype, seed):
    """Teacher tail r_t ~ 1e-7 and student tail r_s ~ 1e-8 (near_full_mass_batch): parity with
    the float64 reference, and (fp32) the KD gradient outside the K ids, which is
    tau w (r_s - r_t) softmax_out(z / tau) and shows in lm_bias's gradient there, to 1e-3 of
    its own size: r_t and r_s must come out right, not as what is left of 1 - sum."""
    x, S = near_full_mass_batch(seed, dtype)
    q = x["teacher_topk_logprobs"].double()
    r_t = -torch.expm1(torch.logsumexp(q, -1))
    if dtype == torch.float32:
        assert ((r_t > 3e-8) & (r_t < 3e-7)).all(), r_t
    check_against_reference(x, impl, dtype)
    if dtype == torch.float32:
        _, parts, grads, _ = run(x, impl, alpha=0.0)
        _, parts_r, grads_r, _ = run(x, "reference", upcast=True, alpha=0.0)
        out = torch.ones(x["lm_bias"].shape[0], dtype=torch.bool)
        out[S] = False
        g_out, g_out_r = grads["lm_bias"][out.to(DEV)], grads_r["lm_bias"][out.to(DEV)]
        assert 0 < g_out_r.abs().max() < 1e-6  # the tail's gradient is there, and tiny
        assert_close(g_out, g_out_r, 1e-3, "KD gradient outside the K ids")
        assert_close(parts["kd"], parts_r["kd"], 1e-5, "kd")


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_topk_packed_rows(impl, adversary, seed):
    """The top-K teacher with packed rows (seq_index) and several chunks, fp32."""
    x = make_batch(seed, B=4, V=261, K=19, teacher="topk", bias=True, domain=True, pool_mask=True, D=5,
                   packed=True)
    check_against_reference(x, impl, torch.float32, adversary=adversary, chunk_rows=7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN warnings of the interpreter
@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_topk_rows_without_target_are_not_read(impl, seed):
    """Positions whose target is ignored may hold anything in teacher_topk_ids / _logprobs
    (ids out of range, repeated, NaN log-probabilities): same loss and gradients as clean
    ones; the teacher's log-probabilities get no gradient; a NaN on a row with a target
    makes kd NaN."""
    x = make_batch(seed, teacher="topk", bias=True, domain=True)
    ign = x["targets"] == -100
    assert ign.any()
    x["teacher_topk_logprobs"].requires_grad_(True)
    loss, parts, grads, args = run(x, impl)
    assert args["teacher_topk_logprobs"].grad is None
    dirty = dict(x)
    dirty["teacher_topk_ids"] = torch.where(ign[..., None], -7, x["teacher_topk_ids"])
    b0, t0 = ign.nonzero()[0].tolist()
    dirty["teacher_topk_ids"][b0, t0] = 10**6  # out of range, and K times the same id
    dirty["teacher_topk_logprobs"] = torch.where(ign[..., None], float("nan"), x["teacher_topk_logprobs"])
    loss_d, parts_d, grads_d, _ = run(dirty, impl)
    torch.testing.assert_close(loss_d, loss)
    for k in grads:
        torch.testing.assert_close(grads_d[k], grads[k], msg=k)
    b, t = [int(i) for i in (~ign).nonzero()[0]]
    nan = dict(x)
    nan["teacher_topk_logprobs"] = x["teacher_topk_logprobs"].detach().clone()
    nan["teacher_topk_logprobs"][b, t, 2] = float("nan")
    _, parts_n, _, _ = run(nan, impl)
    assert torch.isnan(parts_n["kd"])


def test_module_matches_op(seed):
    x = make_batch(seed, teacher="hidden", bias=True, domain=True, pool_mask=True)
    mod = PradaLoss(impl="triton", **{**HYPER, "adv_lambda": 0.2})
    mod.set(adv_lambda=HYPER["adv_lambda"])  # as the trainer's schedule moves it
    a = {k: v.detach() for k, v in x.items()}
    loss_m, parts_m = mod(a.pop("hidden"), a.pop("lm_weight"), a.pop("targets"), **a)
    loss_o, parts_o, _, _ = run(x, "triton")
    torch.testing.assert_close(loss_m, loss_o.detach())
    for k in parts_o:
        torch.testing.assert_close(parts_m[k], parts_o[k])


# ---------------------------------------------------------------- direct op tests


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: an output element the kernels fail to
    write shows up as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("V", [100, 1003])
@pytest.mark.parametrize("teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_rows_matches_torch_rows(dtype, teacher, V, poisoned_empty, seed):
    g = torch.Generator().manual_seed(seed)
    C = 9
    z = (torch.randn(C, V, generator=g) * 3).to(dtype).to(DEV)
    zt = (torch.randn(C, V, generator=g) * 3).to(dtype).to(DEV) if teacher else None
    y = torch.randint(0, V, (C,), generator=g)
    y[[1, 4]] = -100
    y[5] = V - 1  # the last column, in the last (partial) tile
    y = y.to(DEV)
    scale = torch.full((C,), 1 / 7, dtype=torch.float32, device=DEV)
    opts = dict(temperature=1.7, alpha=0.4, ignore_index=-100)
    # torch_rows in fp32 on the same values is the twin (in bf16 it computes in bf16).
    z_ref = z.float().clone()
    ce_r, kd_r = torch_rows(z_ref, None if zt is None else zt.float().clone(), y, scale, **opts)
    z_tri = z.clone()
    ce, kd = triton_rows(z_tri, zt, y, scale, **opts)
    assert ce.dtype == kd.dtype == torch.float32 and z_tri.dtype == dtype
    assert torch.isfinite(ce).all() and torch.isfinite(kd).all() and torch.isfinite(z_tri).all()
    atol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(ce, ce_r, rtol=1e-5, atol=atol)
    torch.testing.assert_close(kd, kd_r, rtol=1e-5, atol=atol)
    assert (ce[[1, 4]] == 0).all() and (kd[[1, 4]] == 0).all()
    assert (z_tri[[1, 4]] == 0).all(), "ignored rows must get dL/dz = 0"
    dz_tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: dL/dz rounded to bf16 (2 ulps)
    torch.testing.assert_close(z_tri.float(), z_ref, rtol=dz_tol, atol=1e-7)


# On a GPU the rows span many autotuned tiles (V = 50257 also starts rows off 16-byte
# alignment); interpreted on a CPU, the shapes stay small.
ROW_SHAPES = [(64, 50257), (48, 128256)] if DEV.type == "cuda" else [(6, 300)]


@pytest.mark.parametrize("C,V", ROW_SHAPES)
@pytest.mark.parametrize("teacher", [False, True], ids=["no_teacher", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_kernel_full_vocabulary_and_repeatable(C, V, teacher, dtype, poisoned_empty, seed):
    """Vocabulary-sized rows against the PyTorch twin, and the same bits on every run (a
    result that moves between runs is a race between warps)."""
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.randn(C, V, generator=g) * 4).to(dtype).to(DEV)
    zt = (torch.randn(C, V, generator=g) * 4).to(dtype).to(DEV) if teacher else None
    y = torch.randint(0, V, (C,), generator=g)
    y[::5] = -100
    y[1] = V - 1
    y = y.to(DEV)
    scale = torch.full((C,), 1.0 / C, device=DEV)
    opts = dict(temperature=1.5, alpha=0.3, ignore_index=-100)
    z_ref = z0.float().clone()
    ce_r, kd_r = torch_rows(z_ref, None if zt is None else zt.float().clone(), y, scale, **opts)
    runs = []
    for _ in range(3):
        z = z0.clone()
        ce, kd = triton_rows(z, zt, y, scale, **opts)
        runs.append((ce, kd, z))
    torch.testing.assert_close(runs[0][0], ce_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1], kd_r, rtol=1e-5, atol=1e-5)
    dz_tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(runs[0][2].float(), z_ref, rtol=dz_tol, atol=1e-7)
    for ce, kd, z in runs[1:]:
        assert torch.equal(ce, runs[0][0]) and torch.equal(kd, runs[0][1]) and torch.equal(z, runs[0][2])


def _cpu_bench(fn, quantiles=None):
    """A do_bench for the autotuner under the interpreter (Triton's own needs a GPU driver)."""
    import time

    fn()  # each timed call restores z first (restore_value)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return [t, t, t] if quantiles else t


def test_autotuned_row_kernel_restores_z(poisoned_empty, seed):
    """The row kernel overwrites z in place, and the autotuner runs it once per config and
    timing before the real call: each trial must start from the original logits. On CUDA the
    trainer's autotuned kernel runs (GPU_CONFIGS); under the interpreter the same wrapper over
    two small configs, timed on the CPU."""
    import triton

    from prada_kernels import fused_linear_distill as fld

    if DEV.type == "cuda":
        kernel = fld._distill_rows_tuned
    else:
        configs = [triton.Config({"BLOCK_V": 64}, num_warps=4), triton.Config({"BLOCK_V": 128}, num_warps=4)]
        kernel = fld.autotuned(fld._distill_rows_kernel, configs=configs, do_bench=_cpu_bench)
    g = torch.Generator().manual_seed(seed)
    C, V = 6, 515
    z = (torch.randn(C, V, generator=g) * 2).to(DEV)
    zt = (torch.randn(C, V, generator=g) * 2).to(DEV)
    y = torch.randint(0, V, (C,), generator=g).to(DEV)
    y[2] = -100
    scale = torch.full((C,), 0.2, device=DEV)
    opts = dict(temperature=1.3, alpha=0.4, ignore_index=-100)
    z_ref = z.clone()
    ce_r, kd_r = torch_rows(z_ref, zt.clone(), y, scale, **opts)
    ce, kd = triton_rows(z, zt, y, scale, kernel=kernel, **opts)
    assert len(kernel.configs) >= 2 and kernel.best_config is not None  # it did tune
    torch.testing.assert_close(ce, ce_r)
    torch.testing.assert_close(kd, kd_r)
    torch.testing.assert_close(z, z_ref)


@pytest.mark.parametrize("spec", ["64,4", "256,2"])
def test_pinned_row_kernel_config(monkeypatch, spec, poisoned_empty, seed):
    """PRADA_ROWS_CONFIG pins the row kernel's tile and warps (no autotuning): same results."""
    monkeypatch.setenv("PRADA_ROWS_CONFIG", spec)
    g = torch.Generator().manual_seed(seed)
    C, V = 5, 300
    z = torch.randn(C, V, generator=g).to(DEV)
    zt = torch.randn(C, V, generator=g).to(DEV)
    y = torch.tensor([3, -100, V - 1, 0, 150], device=DEV)
    scale = torch.full((C,), 0.25, device=DEV)
    opts = dict(temperature=0.8, alpha=0.6, ignore_index=-100)
    z_ref = z.clone()
    ce_r, kd_r = torch_rows(z_ref, zt.clone(), y, scale, **opts)
    ce, kd = triton_rows(z, zt, y, scale, **opts)
    torch.testing.assert_close(ce, ce_r)
    torch.testing.assert_close(kd, kd_r)
    torch.testing.assert_close(z, z_ref)
    monkeypatch.setenv("PRADA_ROWS_CONFIG", "4096")
    with pytest.raises(ValueError, match="BLOCK_V,num_warps"):
        triton_rows(z, zt, y, scale, **opts)


def test_triton_rows_strided_and_all_ignored(poisoned_empty):
    """Non-contiguous chunks (a column slice of a wider buffer) and a chunk of ignored rows."""
    C, V = 5, 300
    base = torch.randn(C, V + 17, device=DEV)  # the global RNG: seeded per test (conftest)
    outside = (base[:, :5].clone(), base[:, 5 + V:].clone())
    z = base[:, 5:5 + V]
    zt_base = torch.randn(V, C, device=DEV)
    zt = zt_base.t()  # stride (1, C)
    y = torch.tensor([3, -100, V - 1, 0, 150], device=DEV)
    scale = torch.full((C,), 0.25, device=DEV)
    opts = dict(temperature=0.8, alpha=0.6, ignore_index=-100)
    z_ref = z.clone()
    ce_r, kd_r = torch_rows(z_ref, zt.clone(), y, scale, **opts)  # torch_rows uses z_t as scratch
    ce, kd = triton_rows(z, zt, y, scale, **opts)
    torch.testing.assert_close(ce, ce_r)
    torch.testing.assert_close(kd, kd_r)
    torch.testing.assert_close(z, z_ref)
    # the columns of the wider buffer outside the slice are untouched
    assert torch.equal(base[:, :5], outside[0]) and torch.equal(base[:, 5 + V:], outside[1])
    y_all = torch.full((C,), -100, device=DEV)
    z2 = torch.randn(C, V, device=DEV)
    ce, kd = triton_rows(z2, zt, y_all, scale, **opts)
    assert (ce == 0).all() and (kd == 0).all() and (z2 == 0).all()


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("D", [3, 5])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_domain_head_matches_torch_domain(dtype, with_bias, D, adversary, poisoned_empty, seed):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 4, 13, 40
    hidden = torch.randn(B, T, H, generator=g).to(dtype).to(DEV)
    mask = (torch.rand(B, T, generator=g) < 0.6).to(DEV)  # bool mask
    mask[0, 0] = True
    mask[2] = False  # an empty row pools to 0
    weight = torch.randn(D, H, generator=g).to(dtype).to(DEV)
    bias = torch.randn(D, generator=g).to(dtype).to(DEV) if with_bias else None
    labels = torch.randint(0, D, (B,), generator=g).to(DEV)
    out = triton_domain_head(hidden, mask, weight, bias, labels, 0.7, adversary)
    ref = torch_domain(hidden, mask, weight, bias, labels, 0.7, adversary)
    for name, a, r in zip(("dom", "dom_acc", "gf", "grad_weight", "grad_bias"), out, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_domain_head_packed_matches_torch_domain(dtype, adversary, poisoned_empty, seed):
    """The packed pooling kernel (sequences of seq_index, gathered by CSR offsets) and the head
    with 1/S against the PyTorch twin: sequences across several position tiles, a sequence
    number that no position uses and one whose positions all have mask 0 (both pool to 0),
    non-contiguous hidden and mask, a float 0/1 mask with a fractional weight."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, D = 3, 29, 40, 4
    hidden = torch.randn(B, T + 3, H, generator=g).to(dtype).to(DEV)[:, 2:-1]  # strided rows
    mask = (torch.rand(T, B, generator=g) < 0.7).float().to(DEV).t()  # transposed: stride (1, B)
    mask[0, 3] = 0.5
    seq = torch.full((B, T), -1, dtype=torch.int64)
    seq[0, :25] = 0                       # one long sequence (several 8-position tiles)
    seq[1, :10], seq[1, 11:20] = 1, 3     # sequence 2: no position at all
    seq[1, 20:] = 4
    seq[2, :5], seq[2, 5:] = 5, 0         # sequence 0 continues in another row
    seq = seq.to(DEV)
    mask[seq == 4] = 0                    # sequence 4: positions, but an empty pool
    S = 6
    weight = torch.randn(D, H, generator=g).to(dtype).to(DEV)
    bias = torch.randn(D, generator=g).to(dtype).to(DEV)
    labels = torch.randint(0, D, (S,), generator=g).to(DEV)
    out = triton_domain_head(hidden, mask, weight, bias, labels, 0.7, adversary, seq_index=seq)
    ref = torch_domain(hidden, mask, weight, bias, labels, 0.7, adversary, seq_index=seq)
    for name, a, r in zip(("dom", "dom_acc", "gf", "grad_weight", "grad_bias"), out, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)
    assert out[2].shape == (S, H)


@pytest.mark.parametrize("V,K", [(100, 1), (100, 100), (300, 45)], ids=["K=1", "K=V", "K=45"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_topk_rows_match_torch_rows(dtype, V, K, poisoned_empty, seed):
    """The top-K row op, Triton against its PyTorch twin (in fp32 on the same values) and
    the per-row kd against the float64 reference's: ids in any order and walking several K
    tiles under the interpreter (tiles of 32), a target inside the K and one outside, a
    teacher probability of 0 (q = -inf), log-probabilities whose exp sums a little over 1
    (r_t clamped to 0), ignored rows holding garbage (ids out of range, NaN)."""
    from prada_fast.op.reference import topk_kd

    g = torch.Generator().manual_seed(seed)
    C, tau = 9, 1.7
    z = (torch.randn(C, V, generator=g) * 3).to(dtype)
    logp = torch.log_softmax(torch.randn(C, V, generator=g, dtype=torch.float64) * 3 / tau, -1)
    q, ids = logp.topk(K, -1)
    perm = torch.rand(C, K, generator=g).argsort(-1)
    ids, q = ids.gather(1, perm), q.gather(1, perm)
    y = torch.randint(0, V, (C,), generator=g)
    y[0] = ids[0, K // 2]                  # the target is one of the K
    if K < V:
        q[2, 0] = float("-inf")            # a teacher probability of 0
        q[3] += 1e-6 - torch.logsumexp(q[3], 0)  # sum p_t = 1 + 1e-6: r_t = 0, no NaN
    y[[1, 4]] = -100
    ids[1], q[4] = V + 3, float("nan")     # garbage on ignored rows
    q = q.to(dtype)
    z, ids, q, y = z.to(DEV), ids.to(DEV), q.to(DEV), y.to(DEV)
    scale = torch.full((C,), 1 / 7, dtype=torch.float32, device=DEV)
    opts = dict(temperature=tau, alpha=0.4, ignore_index=-100)
    z_ref = z.float().clone()
    ce_r, kd_r = torch_rows(z_ref, None, y, scale, topk=(ids, q.float()), **opts)
    z_tri = z.clone()
    ce, kd = triton_rows(z_tri, None, y, scale, topk=(ids, q), **opts)
    assert ce.dtype == kd.dtype == torch.float32 and z_tri.dtype == dtype
    assert torch.isfinite(ce).all() and torch.isfinite(kd).all() and torch.isfinite(z_tri).all()
    torch.testing.assert_close(ce, ce_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd_r, rtol=1e-5, atol=1e-5)
    assert (ce[[1, 4]] == 0).all() and (kd[[1, 4]] == 0).all() and (z_tri[[1, 4]] == 0).all()
    dz_tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(z_tri.float(), z_ref, rtol=dz_tol, atol=1e-7)
    ok = torch.tensor([i not in (1, 4) for i in range(C)], device=DEV)
    kd64 = topk_kd(z.double()[ok], ids[ok], q.double()[ok], tau)
    torch.testing.assert_close(kd[ok].double(), kd64, rtol=1e-5, atol=1e-6)
    # the KD gradient of the float64 reference, on the same logits
    zz = z.double()[ok].requires_grad_()
    (0.6 * (1 / 7) * topk_kd(zz, ids[ok], q.double()[ok], tau).sum()).backward()
    zc = z.double()[ok].requires_grad_()
    ce64 = torch.nn.functional.cross_entropy(zc, y[ok], reduction="sum") * 0.4 / 7
    ce64.backward()
    assert_close(z_tri[ok], zz.grad + zc.grad, 1e-5 if dtype == torch.float32 else 1e-2, "dL/dz")
