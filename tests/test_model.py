"""The PRADA model around a causal LM: next-token targets against Hugging Face's own loss,
the soft prompt, the MLP domain head with its GRL, batched greedy decoding, and errors."""
import pytest
import torch

from prada_fast.model import ModelError, PradaModel, check_same_vocab, load_causal_lm, pick_attention
from prada_fast.op import grad_reverse, masked_mean


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny", seed=11)


def batch(seed, B=3, T=17, V=259):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels, torch.randint(0, 4, (B,), generator=g)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_task_loss_equals_hugging_face_causal_lm_loss(tiny, impl):
    student, _ = tiny
    model = PradaModel(student, n_domains=4, n_prompt=0, loss_impl=impl)
    ids, mask, labels, dom = batch(1)
    loss, parts = model(ids, mask, labels, dom, use_domain=False)
    hf = student(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, hf, rtol=1e-5, atol=1e-6)
    assert parts["n_tokens"] == int((labels[:, 1:] != -100).sum())


def test_soft_prompt_and_linear_head_get_gradients(tiny):
    student, _ = tiny
    model = PradaModel(student, n_domains=4, n_prompt=5, loss_impl="chunked")
    ids, mask, labels, dom = batch(2)
    hidden, ext = model.hidden_states(ids, mask)
    assert hidden.shape[:2] == (3, 17 + 5) and ext[:, :5].eq(1).all()
    loss, parts = model(ids, mask, labels, dom, grl_lambda=0.5)
    loss.backward()
    assert model.soft_prompt.grad.abs().sum() > 0
    assert model.domain_head.out.weight.grad.abs().sum() > 0
    assert parts["dom"] > 0


def test_mlp_head_is_the_grl_term_in_plain_pytorch():
    student, _ = load_causal_lm("tiny", seed=12)
    torch.manual_seed(0)
    model = PradaModel(student, n_domains=4, n_prompt=3, head="mlp", mlp_hidden=16,
                       loss_impl="chunked").double()
    ids, mask, labels, dom = batch(3)
    loss, parts = model(ids, mask, labels, dom, grl_lambda=0.8)
    task, _ = model(ids, mask, labels, dom, use_domain=False)
    hidden, ext = model.hidden_states(ids, mask)
    head = model.domain_head
    c = head.out(torch.relu(head.inner(masked_mean(hidden, ext.double()))))
    expected = torch.nn.functional.cross_entropy(c, dom)
    torch.testing.assert_close(parts["dom"], expected.detach())
    torch.testing.assert_close(loss.detach(), (task + expected).detach())
    # the soft prompt's gradient from the domain term is reversed and scaled by lambda
    g_full = torch.autograd.grad(loss, model.soft_prompt)[0]
    g_task = torch.autograd.grad(task, model.soft_prompt)[0]
    hidden, ext = model.hidden_states(ids, mask)
    f = grad_reverse(masked_mean(hidden, ext.double()), 1.0)
    g_dom_rev = torch.autograd.grad(torch.nn.functional.cross_entropy(
        head.out(torch.relu(head.inner(f))), dom), model.soft_prompt)[0]
    torch.testing.assert_close(g_full, g_task + 0.8 * g_dom_rev)


def test_batched_greedy_decoding_matches_one_at_a_time(tiny):
    student, tok = tiny
    model = PradaModel(student, n_domains=4, n_prompt=4).eval()
    prompts = [tok("Q: 3+4-1=?\nA:", add_special_tokens=False).input_ids,
               tok("Q: Sort 9 1 5.\nA:", add_special_tokens=False).input_ids]
    from prada_fast.evaluation import _left_pad
    ids, mask = _left_pad(prompts, tok.pad_token_id)
    both = model.generate(ids, mask, 12, tok.eos_token_id, tok.pad_token_id)
    for i, p in enumerate(prompts):
        one = model.generate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 12,
                             tok.eos_token_id, tok.pad_token_id)
        n = one.shape[1]
        assert both[i, :n].tolist() == one[0].tolist()


def test_errors_and_attention_choice(tmp_path, tiny):
    with pytest.raises(ModelError, match="not a preset"):
        load_causal_lm(str(tmp_path / "missing"))
    student, tok = tiny
    other, _ = load_causal_lm("tiny", seed=1)
    other.resize_token_embeddings(300)
    with pytest.raises(ModelError, match="vocabulary"):
        check_same_vocab(student, other)
    expected = "sdpa" if not torch.cuda.is_available() else pick_attention()
    assert pick_attention("auto") == expected and pick_attention("eager") == "eager"
