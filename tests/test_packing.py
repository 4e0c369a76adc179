"""Packed rows (trainer/packing.py, models/packed_attention.py): the layout, attention that never crosses a
sequence (each packed sequence's hidden states and logits equal those of the sequence run
alone, on every attention path that runs on the CPU), and a packed step equal to the
padded step on the same examples: loss, parts and every gradient (fp32, 1e-5 relative),
with and without a teacher, with a linear and an MLP domain head."""
from types import SimpleNamespace

import pytest
import torch

from prada_fast.trainer.batching import StepBatches
from prada_fast.data.format import Collator
from prada_fast.teacher.live import teacher_hidden
from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
from prada_fast.models.packed_attention import attention_mode, backbone_forward, block_causal_mask
from prada_fast.trainer.packing import PackedCollator, balanced_rows, first_fit_decreasing, position_counts

V, PAD = 259, 0


def examples(g, n, lo=3, hi=40, n_domains=4):
    """n encoded examples of random lengths in [lo, hi]: a question (labels -100) then,
    for most, a labelled completion; some unlabelled (target-domain) ones."""
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, V, (L,), generator=g).tolist()
        q = int(torch.randint(1, L + 1, (1,), generator=g))
        labels = [-100] * q + ids[q:]
        out.append({"input_ids": ids, "labels": labels, "n_labels": sum(x != -100 for x in labels[1:]),
                    "domain": int(torch.randint(0, n_domains, (1,), generator=g))})
    return out


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- layout
def test_first_fit_decreasing_fills_rows_within_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (53,), generator=g).tolist()
    rows = first_fit_decreasing(lengths, 31)
    assert sorted(i for r in rows for i in r) == list(range(53))
    assert all(sum(lengths[i] for i in r) <= 31 for r in rows)
    # no row could take a later row's first item: first fit
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            assert sum(lengths[i] for i in rows[a]) + lengths[rows[b][0]] > 31
    assert rows == first_fit_decreasing(list(lengths), 31)  # a function of its input
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([5, 32], 31)


def test_balanced_rows_keep_the_fewest_rows_and_narrow_them(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 120, (29,), generator=g).tolist()
    fewest = first_fit_decreasing(lengths, 160)
    rows = balanced_rows(lengths, 160)
    assert sorted(i for r in rows for i in r) == list(range(29)) and len(rows) == len(fewest)
    width = max(sum(lengths[i] for i in r) for r in rows)
    assert width <= max(sum(lengths[i] for i in r) for r in fewest)
    assert rows == balanced_rows(list(lengths), 160)


@pytest.mark.parametrize("K", [0, 3])
def test_packed_collator_layout(seed, K):
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 11)
    width = 41 + K
    b = PackedCollator(PAD, K, width)(exs)
    R, T = b["input_ids"].shape
    assert T <= width and R < 11
    S = len(exs)
    assert b["seq_index"].max() == S - 1
    seen = []
    for s in range(S):
        where = b["seq_index"] == s
        r = int(where.nonzero()[0, 0])
        cols = where[r].nonzero().flatten()
        assert where.sum() == len(cols)  # one row, contiguous
        assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))
        ex = next(e for i, e in enumerate(exs) if i not in seen and len(e["input_ids"]) == len(cols) - K
                  and e["input_ids"] == b["input_ids"][r, cols[K:]].tolist())
        seen.append(exs.index(ex))
        assert b["labels"][r, cols[K:]].tolist() == ex["labels"]
        assert b["attention_mask"][r, cols].tolist() == [0] * K + [1] * (len(cols) - K)
        assert b["position_ids"][r, cols].tolist() == list(range(len(cols)))
        assert b["teacher_position_ids"][r, cols].tolist() == list(range(K)) + list(range(len(cols) - K))
        assert int(b["domain_labels"][s]) == ex["domain"]
    assert sorted(seen) == list(range(S))
    pad = b["seq_index"] < 0
    assert (b["labels"][pad] == -100).all() and (b["attention_mask"][pad] == 0).all()
    real, padding, positions = position_counts(b, K)
    assert real == sum(len(e["input_ids"]) for e in exs) and padding == int(pad.sum())
    assert positions == R * T
    real_p, padding_p, positions_p = position_counts(Collator(PAD)(exs), K)
    longest = max(len(e["input_ids"]) for e in exs)
    assert real_p == real and padding_p == S * longest - real and positions_p == S * (K + longest)


def test_block_causal_mask_against_loops():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1]])
    m = block_causal_mask(pos, torch.float32)[:, 0] == 0
    seg = [[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1]]
    for r in range(2):
        for i in range(8):
            for j in range(8):
                assert bool(m[r, i, j]) == (j <= i and seg[r][i] == seg[r][j])


# ----------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("attn,mode", [("sdpa", None), ("eager", None), ("sdpa", "mask4d"),
                                       ("eager", "mask4d"), ("sdpa", "flash")])
def test_each_packed_sequence_equals_the_sequence_alone(seed, attn, mode, monkeypatch):
    """Logits of every packed sequence (soft prompt in front) against the same sequence
    through the padded path alone; mode "flash": the flattened single row that flash-attn's
    varlen path gets, checked here through SDPA's packed masks."""
    student, _ = load_causal_lm("tiny", attn=attn, seed=seed % 1000)
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=3, loss_impl="chunked",
                                            adversary="grl")).eval()
    assert attention_mode(model.backbone) == "positions"
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 9, hi=30)
    b = PackedCollator(PAD, 3, 34)(exs)
    if mode is not None:
        monkeypatch.setattr("prada_fast.models.prada.backbone_forward",
                            lambda bb, pos, **kw: backbone_forward(bb, pos, mode, **kw))
    with torch.no_grad():
        packed = model.packed_hidden_states(b["input_ids"], b["attention_mask"],
                                            b["position_ids"], b["seq_index"])
    head = student.get_output_embeddings()
    seen = set()
    for s in range(len(exs)):
        where = b["seq_index"] == s
        ids = b["input_ids"][where][3:]
        i = next(i for i, e in enumerate(exs) if i not in seen and e["input_ids"] == ids.tolist())
        seen.add(i)
        with torch.no_grad():
            alone, _ = model.hidden_states(ids[None], torch.ones(1, len(ids), dtype=torch.long))
        assert rel(head(packed[where]), head(alone[0])) < 1e-5, (s, len(ids))


def test_teacher_sees_each_sequence_as_alone(seed):
    teacher, _ = load_causal_lm("tiny-teacher", seed=seed % 1000)
    teacher.eval()
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 7)
    b = PackedCollator(PAD, 4, 45)(exs)
    th, _ = teacher_hidden(SimpleNamespace(module=teacher), b, "cpu")
    for s in range(len(exs)):
        text = (b["seq_index"] == s) & (b["attention_mask"] == 1)
        ids = b["input_ids"][text]
        with torch.no_grad():
            alone = teacher.model(input_ids=ids[None]).last_hidden_state[0]
        assert rel(th[text], alone) < 1e-5


# ----------------------------------------------------------------------------- the step
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def padded_and_packed(model, exs, width, **forward):
    """[(loss, parts, gradients)] of one forward and backward of `model` on `exs`, padded then
    packed into rows of `width` positions (the model's own soft-prompt length)."""
    out = []
    for collate in (Collator(PAD), PackedCollator(PAD, model.n_prompt, width)):
        b = collate(exs)
        extra = {k: b[k] for k in ("position_ids", "seq_index") if k in b}
        model.zero_grad(set_to_none=True)
        loss, parts = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"],
                            **forward, **extra)
        loss.backward()
        out.append((loss.detach(), {k: float(v) for k, v in parts.items()}, _grads(model)))
    return out


@pytest.mark.parametrize("teacher,head,adversary", [
    (False, "none", "grl"), (True, "linear", "grl"), (True, "mlp", "confusion"),
    (False, "linear", "confusion"), (True, "none", "grl"), (False, "linear", "mmd"),
    (True, "linear", "shared-questions")])
def test_packed_step_equals_padded_step(seed, teacher, head, adversary):
    """shared-questions: several rationales of one question (rows with the same question and
    qid), each question counted once in the domain term (confusion), padded and packed."""
    student, _ = load_causal_lm("tiny", seed=seed % 1000)
    shared = adversary == "shared-questions"
    model = PradaModel(student, PradaConfig(
        n_domains=4, n_prompt=5, head="mlp" if head == "mlp" else "linear",
        mlp_hidden=24 if head == "mlp" else 0, loss_impl="chunked",
        adversary="confusion" if shared else adversary))
    t_engine = None
    if teacher:
        t, _ = load_causal_lm("tiny-teacher", seed=seed % 1000 + 1)
        t_engine = SimpleNamespace(module=t.eval().requires_grad_(False))
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 13, hi=37)
    if shared:  # 13 rows over 5 questions: a row's question and domain are its question's
        for i, e in enumerate(exs):
            src = exs[i % 5]
            q = src["labels"].index(next(x for x in src["labels"] if x != -100)) \
                if any(x != -100 for x in src["labels"]) else len(src["labels"])
            e["input_ids"] = src["input_ids"][:q] + e["input_ids"][q:]
            e["labels"] = [-100] * q + e["input_ids"][q:]
            e["n_labels"] = sum(x != -100 for x in e["labels"][1:])
            e["domain"], e["qid"] = src["domain"], i % 5
    n_valid = sum(e["n_labels"] for e in exs) + 17  # as if part of a larger global batch
    results = []
    for collate in (Collator(PAD), PackedCollator(PAD, 5, 42)):
        b = collate(exs)
        th, tw = teacher_hidden(t_engine, b, "cpu")
        extra = {k: b[k] for k in ("position_ids", "seq_index", "question_index") if k in b}
        assert ("question_index" in b) == shared
        model.zero_grad(set_to_none=True)
        loss, parts = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"],
                            teacher_hidden=th, teacher_weight=tw, adv_lambda=0.7, num_valid_tokens=n_valid,
                            temperature=2.0, alpha=0.3, use_domain=head != "none", **extra)
        (1.5 * loss).backward()
        results.append((loss.detach(), {k: v.clone() for k, v in parts.items()}, _grads(model)))
    (l_pad, p_pad, g_pad), (l_pack, p_pack, g_pack) = results
    assert packed_is_smaller(exs)
    assert rel(l_pack, l_pad) < 1e-5
    for k in ("ce", "kd", "dom", "dom_acc", "n_tokens"):
        assert abs(float(p_pack[k]) - float(p_pad[k])) <= 1e-5 * abs(float(p_pad[k])) + 1e-7, k
    assert (p_pad["kd"] > 0) == teacher and (p_pad["dom"] > 0) == (head != "none")
    assert g_pad.keys() == g_pack.keys() and "soft_prompt" in g_pad
    assert any(k.startswith("domain_head") for k in g_pad) == (head != "none")
    for k in g_pad:
        assert rel(g_pack[k], g_pad[k]) < 1e-5, k


def packed_is_smaller(exs):
    real_pad, pad_pad, _ = position_counts(Collator(PAD)(exs), 5)
    real_pack, pad_pack, _ = position_counts(PackedCollator(PAD, 5, 42)(exs), 5)
    return real_pad == real_pack and pad_pack < pad_pad


# ----------------------------------------------------------------------------- batches by tokens
def test_tokens_per_batch_cuts_the_stream_deterministically(seed):
    """Micro-batches by tokens: within the budget (or one example), consecutive in the
    epochs' stream across steps, ranks and micro-steps; the normaliser counts the whole
    global batch; a fresh instance (a resumed run) gives the same step at once."""
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 37, hi=60)
    K, budget, world, accum = 4, 150, 2, 3

    def make(rank):
        return StepBatches(exs, lambda b: [id(e) for e in b], global_batch=world * accum, micro_batch=1,
                           world_size=world, rank=rank, seed=seed % 1000, tokens_per_batch=budget, n_prompt=K)
    ranks = [make(0), make(1)]
    cost_of = {id(e): K + len(e["input_ids"]) for e in exs}
    stream, cuts = [], []
    for step in range(9):
        per_rank = [r.step(step) for r in ranks]
        assert per_rank[0][1] == per_rank[1][1]
        micro = [per_rank[r][0][a] for a in range(accum) for r in range(world)]  # global order
        assert len(micro) == accum * world
        for mb in micro:
            assert sum(cost_of[i] for i in mb) <= budget or len(mb) == 1
        cuts += micro
        ids = [i for mb in micro for i in mb]
        assert per_rank[0][1] == sum(e["n_labels"] for i in ids for e in exs if id(e) == i)
        stream += ids
    n = len(exs)
    for e in range(len(stream) // n):  # every full epoch is a permutation of the examples
        assert sorted(stream[e * n:(e + 1) * n]) == sorted(map(id, exs))
    assert len(stream) > n  # the steps crossed an epoch boundary
    resumed = make(1)
    assert resumed.step(7) == ranks[1].step(7)
    for mb, after in zip(cuts, cuts[1:]):  # greedy: the stream's next example did not fit
        assert sum(cost_of[i] for i in mb) + cost_of[after[0]] > budget


def test_normaliser_is_exact_under_accumulation_and_ranks(seed):
    """One optimizer step of packed micro-batches by tokens over 2 ranks x 3 micro-steps,
    each loss normalised by n_valid / (world x accum) and the gradients averaged as
    DeepSpeed does, equals the loss and gradient of the whole global batch as one batch."""
    student, _ = load_causal_lm("tiny", seed=seed % 1000)
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=3, loss_impl="chunked", adversary="grl"))
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 23, hi=45)
    world, accum = 2, 3
    collate = PackedCollator(PAD, 3, 48)
    loss_sum = 0.0
    model.zero_grad(set_to_none=True)
    n_tokens = 0
    for rank in range(world):
        batches = StepBatches(exs, collate, global_batch=world * accum, micro_batch=1, world_size=world,
                              rank=rank, seed=seed % 1000, tokens_per_batch=130, n_prompt=3)
        micro, n_valid = batches.step(0)
        norm = n_valid / (world * batches.accum)
        for mb in micro:
            loss, parts = model(mb["input_ids"], mb["attention_mask"], mb["labels"], mb["domain_labels"],
                                num_valid_tokens=norm, use_domain=False, position_ids=mb["position_ids"],
                                seq_index=mb["seq_index"])
            (loss / (accum * world)).backward()  # DeepSpeed: 1/accum per micro-step, mean over ranks
            loss_sum += float(loss.detach()) / (accum * world)
            n_tokens += int(parts["n_tokens"])
    got = _grads(model)
    everything = [exs[i] for i in batches.global_indices(0)]
    assert n_tokens == n_valid == sum(e["n_labels"] for e in everything)
    assert len(everything) > world * accum  # by tokens, more than one example per micro-batch
    b = Collator(PAD)(everything)
    model.zero_grad(set_to_none=True)
    whole, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"], use_domain=False)
    whole.backward()
    assert abs(loss_sum - float(whole.detach())) <= 1e-5 * abs(float(whole.detach()))
    want = _grads(model)
    for k in want:
        assert rel(got[k], want[k]) < 1e-5, k


def test_attention_mode_picks_varlen_masks_or_the_4d_fallback():
    """flash_attention_2: flattened rows (varlen); a model whose module builds its masks with
    transformers' create_causal_mask: the position ids; any other model: the 4-D mask."""
    student, _ = load_causal_lm("tiny", attn="sdpa", seed=1)
    assert attention_mode(student.model) == "positions"
    student.config._attn_implementation = "flash_attention_2"
    assert attention_mode(student.model) == "flash"

    class Foreign(torch.nn.Module):  # a model of its own, building no transformers masks
        config = SimpleNamespace(_attn_implementation="sdpa")
    assert attention_mode(Foreign()) == "mask4d"
    with pytest.raises(ValueError, match="mode"):
        backbone_forward(Foreign(), torch.zeros(1, 3, dtype=torch.long), "dense", input_ids=None)
