"""What the op's parity checks share (the tests and the benchmarks use these, not copies):
the tolerances of docs/design.md, the relative error they are measured in, and a builder
of random op inputs.

Parity: ||x - x_ref|| / ||x_ref|| against the float64 reference on upcast inputs is at
most TOLERANCES[dtype]["loss"] for the loss and its parts, TOLERANCES[dtype]["grad"] for
every gradient; NaN never passes.
"""
from __future__ import annotations

import math

import torch

from .options import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCES = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-2, "grad": 2e-2}}
# The op's differentiable inputs, in the order the fused op returns their gradients.
GRAD_NAMES = ("hidden", "lm_weight", "lm_bias", "domain_weight", "domain_bias")


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def tolerance(dtype: torch.dtype | str, what: str) -> float:
    """The parity tolerance of `what` ("loss" or "grad") for inputs of `dtype` (fp16 and
    other low-precision types take bf16's)."""
    return TOLERANCES.get(dtype_name(dtype), TOLERANCES["bfloat16"])[what]


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (||x - ref|| where ref is 0); NaN, which never
    passes a `<=` test, when x is not finite. x and ref: tensors or Python numbers."""
    x = torch.as_tensor(x, dtype=None if torch.is_tensor(x) else torch.float64).detach()
    if not torch.is_tensor(ref):
        ref = torch.tensor(ref, dtype=torch.float64)  # a Python float: keep all its digits
    ref = ref.detach().to(x.device, torch.float64)  # on x's device (GPU: big tensors)
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        return math.nan
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def random_inputs(*, B: int, T: int, H: int, V: int, Ht: int = 0, D: int = 0,
                  dtype: str | torch.dtype = "float32", bias: bool = False,
                  teacher_logits: bool = False, ignore_frac: float = 0.0, pool_mask: bool = False,
                  empty_pool_row: bool = False, seed: int = 0, device="cpu",
                  packed: bool = False, topk: int = 0, tau: float = 1.0) -> dict:
    """Random arguments of `prada_loss` as a dict of leaves (those with a gradient require
    grad), a deterministic function of the arguments and the device type.

    Ht > 0: the teacher as hidden states + head weight; teacher_logits: as logits; topk = K > 0:
    as the top-K log-probabilities at temperature `tau` of random logits (teacher_topk_ids,
    teacher_topk_logprobs, the latter in `dtype`; ids in descending order of probability). D > 0: a
    linear domain head with labels. ignore_frac: the fraction of targets set to IGNORE_INDEX.
    pool_mask: a random 0/1 mask (position 0 kept); empty_pool_row: the last row's mask
    all 0 (it pools to 0). packed: several sequences per row (`packed_seq_index`), with
    "seq_index" (B, T) and domain_labels (S,); with a pool mask, each sequence keeps its first
    position, and with empty_pool_row one sequence's mask is all 0 instead of the last row's."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype_name(dtype)]

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device=device)
        if scale != 1.0:
            t.mul_(scale)
        return t.to(dt)

    x = {"hidden": randn(B, T, H), "lm_weight": randn(V, H, scale=2 / math.sqrt(H))}
    y = torch.randint(0, V, (B, T), generator=g, device=device)
    if ignore_frac:
        y[torch.rand(B, T, generator=g, device=device) < ignore_frac] = IGNORE_INDEX
    x["targets"] = y
    if bias:
        x["lm_bias"] = randn(V, scale=0.5)
    if Ht:
        x["teacher_hidden"] = randn(B, T, Ht)
        x["teacher_weight"] = randn(V, Ht, scale=2 / math.sqrt(Ht))
    if teacher_logits:
        x["teacher_logits"] = randn(B, T, V, scale=2.0)
    if topk:
        logp = torch.log_softmax(torch.randn(B, T, V, generator=g, device=device, dtype=torch.float64)
                                 * (2.0 / tau), -1)
        q, ids = logp.topk(topk, -1)
        x["teacher_topk_ids"], x["teacher_topk_logprobs"] = ids, q.to(dt)
    if D:
        x["domain_weight"] = randn(D, H, scale=1 / math.sqrt(H))
        x["domain_bias"] = randn(D, scale=0.5)
        x["domain_labels"] = torch.randint(0, D, (B,), generator=g, device=device)
    if pool_mask or empty_pool_row:
        m = (torch.rand(B, T, generator=g, device=device) < 0.7).to(dt) if pool_mask \
            else torch.ones(B, T, dtype=dt, device=device)
        m[:, 0] = 1
        if empty_pool_row and not packed:
            m[-1] = 0
        x["pool_mask"] = m
    if packed:  # drawn last: the unpacked inputs of the same arguments stay the same
        seq, S = packed_seq_index(B, T, g, device)
        x["seq_index"] = seq
        if D:
            x["domain_labels"] = torch.randint(0, D, (S,), generator=g, device=device)
        if "pool_mask" in x:
            m = x["pool_mask"]
            flat = seq.reshape(-1)
            first = torch.ones_like(flat, dtype=torch.bool)
            first[1:] = flat[1:] != flat[:-1]
            m.view(-1)[first & (flat >= 0)] = 1  # every sequence pools over >= 1 position ...
            if empty_pool_row:
                m[seq == S // 2] = 0  # ... but one, which pools to 0
    for k in GRAD_NAMES:
        if k in x:
            x[k].requires_grad_(True)
    return x


def packed_seq_index(B: int, T: int, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, int]:
    """(seq_index (B, T) int64, S): packed rows for tests and benchmarks, sequences numbered
    0..S-1 in row order. Row 0 holds one sequence and 2 positions of padding (-1); row 1 many
    short ones (lengths 1, 2, 3, ...) with a -1 after every third; the other rows random lengths
    in [2, max(2, T // 3)] with -1 gaps, a row's last sequence cut at the row's end."""
    seq = torch.full((B, T), -1, dtype=torch.int64)
    s = 0

    def rand(lo, hi):  # an int in [lo, hi]
        return int(torch.randint(lo, hi + 1, (1,), generator=generator, device=generator.device))

    for b in range(B):
        t = 0
        if b == 0:
            seq[b, : max(1, T - 2)] = s
            s += 1
            continue
        k = 0
        while t < T:
            n = min(T - t, 1 + k % 3 if b == 1 else rand(2, max(2, T // 3)))
            seq[b, t: t + n] = s
            s += 1
            k += 1
            t += n
            if (b == 1 and k % 3 == 0) or (b > 1 and rand(0, 9) < 3):
                t += 1  # a position of no sequence
    return seq.to(device), s
