"""The live teacher's memory of its outputs per record (teacher/live.py `TeacherMemo`,
`--teacher-memo-mb`) and the auto teacher's packed fit (teacher/fit.py `packed_lm_loss`),
each against an independent float64 reference on fresh random examples of odd lengths."""
from types import SimpleNamespace

import pytest
import torch

from prada_fast.data.format import Collator
from prada_fast.models import load_causal_lm
from prada_fast.teacher.cache import labelled_positions
from prada_fast.teacher.fit import packed_lm_loss
from prada_fast.teacher.live import LiveTeacher, teacher_hidden
from prada_fast.trainer.packing import PackedCollator
from tests.test_packing import PAD, examples, rel


def teacher_model(seed, dtype=torch.float32):
    teacher, _ = load_causal_lm("tiny-teacher", seed=seed % 1000)
    return teacher.to(dtype).eval()


def alone(teacher, ids) -> torch.Tensor:
    """The teacher's last hidden states on one sequence of token ids, run by itself (float64)."""
    t64 = teacher.to(torch.float64)
    with torch.no_grad():
        out = t64.model(input_ids=ids[None]).last_hidden_state[0]
    teacher.to(torch.float32)
    return out


@pytest.mark.parametrize("n_prompt", [0, 3])
def test_memo_gives_each_records_rows_in_another_batch(seed, n_prompt):
    teacher = teacher_model(seed)
    g = torch.Generator().manual_seed(seed)
    exs = examples(g, 9)
    live = LiveTeacher(SimpleNamespace(module=teacher), memo_bytes=1 << 24)
    first = PackedCollator(PAD, n_prompt, 57)(exs)
    live.op_inputs(first, "cpu")
    assert (live.forwards, live.skipped) == (1, 0)
    assert len(live.memo.rows) == sum(1 for ex in exs if labelled_positions(ex["labels"]))
    # the same records, another order and row width: read from memory, no forward
    order = torch.randperm(len(exs), generator=g).tolist()
    again = [exs[i] for i in order]
    b = PackedCollator(PAD, n_prompt, 83)(again)
    th = live.op_inputs(b, "cpu")["teacher_hidden"]
    assert (live.forwards, live.skipped) == (1, 1)
    read = torch.zeros(th.shape[:2], dtype=torch.bool)
    for s in range(len(again)):  # packed order: sequence s of the rows
        text = (b["seq_index"] == s) & (b["attention_mask"] == 1)
        pos = labelled_positions(b["labels"][text].tolist())
        if not pos:
            continue
        where = text.nonzero()[pos]
        read[where[:, 0], where[:, 1]] = True
        assert rel(th[where[:, 0], where[:, 1]], alone(teacher, b["input_ids"][text])[pos]) < 1e-5
    assert th[~read].abs().max() == 0  # the op never reads the other rows


def test_memo_forwards_a_batch_with_a_new_record_and_respects_its_cap(seed):
    teacher = teacher_model(seed)
    g = torch.Generator().manual_seed(seed)
    exs = [ex for ex in examples(g, 12) if ex["n_labels"] > 0]
    collate = PackedCollator(PAD, 0, 64)
    live = LiveTeacher(SimpleNamespace(module=teacher), memo_bytes=1 << 24)
    live.op_inputs(collate(exs[:5]), "cpu")
    th = live.op_inputs(collate(exs[3:7]), "cpu")["teacher_hidden"]  # two new records: forward
    assert (live.forwards, live.skipped, len(live.memo.rows)) == (2, 0, 7)
    fresh, _ = teacher_hidden(SimpleNamespace(module=teacher), collate(exs[3:7]), "cpu")
    assert torch.equal(th, fresh)  # a forward gives the forward's own output
    # a cap that holds two records: the rest are recomputed every time, nothing is lost
    one = len(labelled_positions(exs[0]["labels"])) * teacher.config.hidden_size * 4
    small = LiveTeacher(SimpleNamespace(module=teacher), memo_bytes=int(one) * 2 + 7)
    small.op_inputs(collate(exs[:5]), "cpu")
    assert small.memo.full and 1 <= len(small.memo.rows) < 5 and small.memo.bytes <= small.memo.max_bytes
    small.op_inputs(collate(exs[:5]), "cpu")
    assert (small.forwards, small.skipped) == (2, 0)


def test_packed_fit_loss_equals_the_padded_models_own_loss(seed):
    """The auto teacher's fit on packed rows: the loss and every gradient of
    transformers' own padded loss (labels shifted inside the model), in float64."""
    model, _ = load_causal_lm("tiny-teacher", seed=seed % 1000)
    model = model.to(torch.float64).train()
    g = torch.Generator().manual_seed(seed)
    exs = [ex for ex in examples(g, 11, lo=2) if ex["n_labels"] > 0]
    grads = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        if packed:
            loss = packed_lm_loss(model, PackedCollator(PAD, 0, 61)(exs))
        else:
            b = Collator(PAD)(exs)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         labels=b["labels"]).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert rel(l1, l0) < 1e-12
    assert g0.keys() == g1.keys()
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-10, n
