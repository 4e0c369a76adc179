"""The auxiliary language-model term on the questions (`--lm-weight W`, issue 26): which
positions it trains, its value against a float64 reference built from the full logits, the
same value and gradients packed and padded, and the flag through the trainer."""
import json

import pytest
import torch

from prada_fast.data.format import Collator
from prada_fast.models import PradaConfig, PradaModel, load_causal_lm

from runner import FAST
from test_packing import PAD, examples, padded_and_packed, rel


def _model(seed, n_prompt, dtype=torch.float32):
    student, _ = load_causal_lm("tiny", seed=seed % 1000)
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=n_prompt, loss_impl="chunked"))
    return model.to(dtype)


def test_the_targets_are_the_next_question_tokens_of_the_same_sequence():
    """Question tokens a b c, completion d e (labelled), then padding: a -> b and b -> c are
    trained, c -> d is the task term's; packed, a sequence never predicts the next one's."""
    model = _model(0, n_prompt=2)
    ids = torch.tensor([[11, 12, 13, 14, 15, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 14, 15, -100]])
    t = model.question_lm_targets(ids, mask, labels)
    assert t.tolist() == [[-100, -100, 12, 13, -100, -100, -100, -100]]  # 2 prompt slots first
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])  # two target records packed: (11 12) (13 14 15)
    packed = model.question_lm_targets(ids, mask, torch.full_like(ids, -100), seq)
    assert packed.tolist() == [[12, -100, 14, 15, -100, -100]]


def test_the_term_equals_a_float64_reference_from_the_full_logits(seed):
    """W x the mean cross-entropy of the question tokens' next tokens, from logits built
    whole in float64 (hidden @ W^T), at odd sizes; off (W = 0) the loss is the plain one."""
    g = torch.Generator().manual_seed(seed)
    model = _model(seed, n_prompt=3, dtype=torch.float64)
    exs = examples(g, 7, hi=23)
    b = Collator(PAD)(exs)
    args = (b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"])
    w = float(torch.rand(1, generator=g)) + 0.25
    base, _ = model(*args, adv_lambda=0.5, lm_weight=0.0)
    loss, parts = model(*args, adv_lambda=0.5, lm_weight=w)
    hidden, _ = model.hidden_states(b["input_ids"], b["attention_mask"])
    logits = hidden @ model.student.get_output_embeddings().weight.T  # (B, K + T, V), float64
    K, terms = model.n_prompt, []
    for r, e in enumerate(exs):
        n_q = sum(x == -100 for x in e["labels"])  # its question's tokens come first
        for t in range(n_q - 1):
            terms.append(-torch.log_softmax(logits[r, K + t], -1)[e["input_ids"][t + 1]])
    ref = torch.stack(terms).mean()
    assert float(parts["lm"]) == pytest.approx(float(ref), rel=1e-10)
    assert float(loss - base) == pytest.approx(w * float(ref), rel=1e-9)
    assert "lm" not in model(*args, adv_lambda=0.5)[1]


def test_packed_equals_padded_with_the_term(seed):
    g = torch.Generator().manual_seed(seed)
    model = _model(seed, n_prompt=5)
    exs = examples(g, 11, hi=37)
    (l_pad, p_pad, g_pad), (l_pack, p_pack, g_pack) = padded_and_packed(
        model, exs, 42, adv_lambda=0.3, lm_weight=0.8)
    lm_pad, lm_pack = p_pad["lm"], p_pack["lm"]
    assert lm_pad > 0 and abs(lm_pack - lm_pad) <= 1e-5 * lm_pad
    assert rel(l_pack, l_pad) < 1e-5
    assert g_pad.keys() == g_pack.keys()
    for k in g_pad:
        assert rel(g_pack[k], g_pad[k]) < 1e-5, k


def test_lm_weight_in_a_run_logs_the_term(in_process, tmp_path):
    out = tmp_path / "run"
    assert in_process([*FAST, "--teacher", "none", "--max-steps", "2", "--eval-per-domain", "0",
                       "--lm-weight", "0.5", "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["lm"] > 0 for r in rows)
