"""The PRADA model around a causal LM: next-token targets against Hugging Face's own loss,
the soft prompt, the MLP domain head with its GRL, batched greedy decoding, and errors."""
import pytest
import torch

from prada_fast.models import (ModelError, PradaConfig, PradaModel, check_same_vocab, load_causal_lm,
                               pick_attention)
from prada_fast.op import masked_mean


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
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=0, loss_impl=impl, adversary="grl"))
    ids, mask, labels, dom = batch(1)
    loss, parts = model(ids, mask, labels, dom, use_domain=False)
    hf = student(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, hf, rtol=1e-5, atol=1e-6)
    assert parts["n_tokens"] == int((labels[:, 1:] != -100).sum())


def test_soft_prompt_and_linear_head_get_gradients(tiny):
    student, _ = tiny
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=5, loss_impl="chunked", adversary="grl"))
    ids, mask, labels, dom = batch(2)
    hidden, ext = model.hidden_states(ids, mask)
    assert hidden.shape[:2] == (3, 17 + 5) and ext[:, :5].eq(1).all()
    loss, parts = model(ids, mask, labels, dom, adv_lambda=0.5)
    loss.backward()
    assert model.soft_prompt.grad.abs().sum() > 0
    assert model.domain_head.out.weight.grad.abs().sum() > 0
    assert parts["dom"] > 0


def test_the_soft_prompt_starts_random_or_on_token_embeddings(tiny):
    """--prompt-init: random draws K x H Gaussians at the embeddings' std from torch's global
    generator (the same draws as before the flag existed); vocab takes the embedding rows of
    K token ids drawn from the vocabulary, reproducibly under a seed, as a trainable copy."""
    student, _ = tiny
    emb = student.get_input_embeddings().weight.detach()
    seed = int(torch.randint(0, 2**31, (1,)))
    torch.manual_seed(seed)
    rnd = PradaModel(student, PradaConfig(n_domains=3, n_prompt=7)).soft_prompt.detach()
    torch.manual_seed(seed)
    torch.testing.assert_close(rnd, torch.randn(7, emb.shape[1]) * emb.std(), rtol=0, atol=0)
    torch.manual_seed(seed)
    voc = PradaModel(student, PradaConfig(n_domains=3, n_prompt=7, prompt_init="vocab")).soft_prompt
    torch.manual_seed(seed)
    ids = torch.randint(emb.shape[0], (7,))
    assert torch.equal(voc.detach(), emb[ids])  # rows of the embedding matrix, in its order
    dist = torch.cdist(rnd.double(), emb.double()).min(1).values
    assert (dist > 1e-3).all()  # the random start is no token's embedding
    assert voc.data_ptr() != emb.data_ptr() and voc.requires_grad  # a copy, trained on its own
    with pytest.raises(ModelError, match="prompt init"):
        PradaConfig(n_domains=3, prompt_init="words")
    older = {"domains": ["a", "b"], "domain_head": "linear", "n_prompt": 4}  # no prompt_init key
    assert PradaConfig.from_meta(older).prompt_init == "random"


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_prompt_encoder_output_is_the_prompt_and_trains(kind):
    """P-tuning: the vectors in front of the input are the encoder's output on the free
    vectors (checked against the equations in float64, the LSTM by PyTorch's cell), and the
    free vectors and every encoder weight get gradients."""
    student, _ = load_causal_lm("tiny", seed=13)
    model = PradaModel(student, PradaConfig(n_domains=3, n_prompt=5, prompt_encoder=kind, prompt_hidden=24,
                       loss_impl="chunked", adversary="grl")).double()
    enc, free = model.prompt_encoder, model.soft_prompt
    x = free
    if kind == "lstm":  # two bidirectional layers, the gate equations written out
        for layer in range(2):
            outs = []
            for suffix, order in (("", range(5)), ("_reverse", reversed(range(5)))):
                w_ih = getattr(enc.lstm, f"weight_ih_l{layer}{suffix}")
                w_hh = getattr(enc.lstm, f"weight_hh_l{layer}{suffix}")
                b = (getattr(enc.lstm, f"bias_ih_l{layer}{suffix}")
                     + getattr(enc.lstm, f"bias_hh_l{layer}{suffix}"))
                h = c = torch.zeros(24, dtype=torch.float64)
                seq = [None] * 5
                for t in order:
                    i, f, g, o = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    seq[t] = h
                outs.append(torch.stack(seq))
            x = torch.cat(outs, 1)
    expect = torch.relu(x @ enc.inner.weight.T + enc.inner.bias) @ enc.out.weight.T + enc.out.bias
    torch.testing.assert_close(model.prompt_vectors(), expect, rtol=1e-10, atol=1e-12)
    ids, mask, labels, dom = batch(4)
    emb, _ = model.embed(ids, mask)
    torch.testing.assert_close(emb[1, :5], model.prompt_vectors(), rtol=0, atol=0)
    loss, _ = model(ids, mask, labels, dom, adv_lambda=0.5)
    loss.backward()
    assert free.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_export_bakes_the_prompt_encoder(tmp_path):
    """final/ holds the encoder's output as plain vectors: the reloaded model has no encoder
    and gives the same logits as the trained one."""
    from prada_fast.models.final import export_final
    student, tok = load_causal_lm("tiny", seed=14)
    model = PradaModel(student, PradaConfig(n_domains=3, n_prompt=4, prompt_encoder="lstm")).eval()
    with torch.no_grad():
        model.soft_prompt.normal_()  # away from the initial values
    meta = {"domains": ["a", "b", "c"], "n_prompt": 4, "domain_head": "linear",
            "prompt_encoder": "lstm"}
    export_final(model, tok, tmp_path / "final", meta)
    loaded, _, _ = PradaModel.from_final(tmp_path / "final", attn="sdpa")
    assert loaded.prompt_encoder is None
    torch.testing.assert_close(loaded.soft_prompt, model.prompt_vectors(), rtol=1e-5, atol=1e-7)
    ids, mask, *_ = batch(5)
    with torch.no_grad():
        h0, _ = model.hidden_states(ids, mask)
        h1, _ = loaded.hidden_states(ids, mask)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
def test_mlp_head_is_the_adversarial_term_in_plain_pytorch(adversary):
    student, _ = load_causal_lm("tiny", seed=12)
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=3, head="mlp", mlp_hidden=16,
                       loss_impl="chunked", adversary=adversary)).double()
    ids, mask, labels, dom = batch(3)
    loss, parts = model(ids, mask, labels, dom, adv_lambda=0.8)
    task, _ = model(ids, mask, labels, dom, use_domain=False)
    head = model.domain_head
    pool = model.pool_mask(mask, labels).double()

    def head_loss(f):
        return torch.nn.functional.cross_entropy(head.out(torch.relu(head.inner(f))), dom)

    hidden, _ = model.hidden_states(ids, mask)
    expected = head_loss(masked_mean(hidden, pool))
    torch.testing.assert_close(parts["dom"], expected.detach())
    torch.testing.assert_close(loss.detach(), (task + expected).detach())  # value: L_task + L_dom
    # The soft prompt's gradient from the domain term: -lambda dL_dom (grl) or +lambda dL_conf
    # (confusion, L_conf = CE to the uniform distribution through the head).
    g_full, g_head_full = torch.autograd.grad(loss, [model.soft_prompt, head.inner.weight])
    g_task = torch.autograd.grad(task, model.soft_prompt)[0]
    hidden, _ = model.hidden_states(ids, mask)
    f = masked_mean(hidden, pool)
    if adversary == "grl":
        g_adv = -0.8 * torch.autograd.grad(head_loss(f), model.soft_prompt)[0]
    else:
        c = head.out(torch.relu(head.inner(f)))
        conf = (torch.logsumexp(c, -1) - c.mean(-1)).mean()
        g_adv = 0.8 * torch.autograd.grad(conf, model.soft_prompt)[0]
    torch.testing.assert_close(g_full, g_task + g_adv)
    # the head itself learns from L_dom under either adversary
    g_head = torch.autograd.grad(head_loss(masked_mean(hidden.detach(), pool)), head.inner.weight)[0]
    torch.testing.assert_close(g_head_full, g_head)


def test_pool_mask_is_the_question(tiny):
    """Domain features pool over the question's positions (labels ignored, not padding, not
    the soft prompt), or every real token with pool="sequence"."""
    student, _ = tiny
    ids, mask, labels, dom = batch(4)
    q = PradaModel(student, PradaConfig(n_domains=4, n_prompt=2)).pool_mask(mask, labels)
    assert q.shape == (3, 2 + 17) and (q[:, :2] == 0).all()
    assert q[:, 2:].eq((mask == 1) & (labels == -100)).all()
    assert q[:, 2:7].eq(1).all() and q[:, 7:].eq(0).all()   # batch(): 5 question tokens
    s = PradaModel(student, PradaConfig(n_domains=4, n_prompt=2, pool="sequence")).pool_mask(mask, labels)
    assert s[:, 2:].eq(mask).all() and (s[:, :2] == 0).all()
    with pytest.raises(ModelError, match="pool"):
        PradaModel(student, PradaConfig(n_domains=4, pool="answer"))


def test_domain_head_learning_rate_group():
    """--domain-head-lr-mult: the head in an optimizer group of its own at X times the lr;
    refused with a scheduler that would set one lr for every group."""
    from prada_fast.trainer.dsconfig import ConfigError
    from prada_fast.trainer.engines import param_groups

    student, _ = load_causal_lm("tiny", seed=1)
    model = PradaModel(student, PradaConfig(n_domains=3, n_prompt=2))
    cfg = {"optimizer": {"params": {"lr": 2e-3}}, "scheduler": {"type": "WarmupCosineLR"}}
    student_group, head_group = param_groups(model, 10.0, cfg)
    assert head_group["lr"] == pytest.approx(2e-2) and student_group["lr"] == 2e-3
    head_ids = {id(p) for p in model.domain_head.parameters()}
    assert {id(p) for p in head_group["params"]} == head_ids
    assert len(student_group["params"]) + len(head_group["params"]) == len(list(model.parameters()))
    assert len(param_groups(model, 1.0, cfg)) == len(list(model.parameters()))  # one plain list
    with pytest.raises(ConfigError, match="WarmupLR"):
        param_groups(model, 10.0, {**cfg, "scheduler": {"type": "WarmupLR"}})


def test_batched_greedy_decoding_matches_one_at_a_time(tiny):
    student, tok = tiny
    model = PradaModel(student, PradaConfig(n_domains=4, n_prompt=4)).eval()
    prompts = [tok("Q: 3+4-1=?\nA:", add_special_tokens=False).input_ids,
               tok("Q: Sort 9 1 5.\nA:", add_special_tokens=False).input_ids]
    from prada_fast.models.generation import left_pad
    ids, mask = left_pad(prompts, tok.pad_token_id)
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


def test_prada_config_defaults_checks_and_saved_fields():
    """PradaConfig's defaults are the trainer's flags' (adversary confusion); final/'s
    prada_config.json round-trips through it (a prompt encoder loads as baked vectors), and
    an older file's missing keys mean what older versions meant (grl, whole sequences)."""
    from prada_fast.models import PradaConfig
    assert PradaConfig(n_domains=2).adversary == "confusion"
    with pytest.raises(ModelError, match="adversary"):
        PradaConfig(n_domains=2, adversary="dann")
    saved = {"domains": ["a", "b"], **PradaConfig(n_domains=2, n_prompt=3, prompt_encoder="mlp").to_meta()}
    assert PradaConfig.from_meta(saved) == PradaConfig(n_domains=2, n_prompt=3)
    old = PradaConfig.from_meta({"domains": ["a", "b", "c"], "n_prompt": 4, "domain_head": "mlp"}, "chunked")
    assert old == PradaConfig(n_domains=3, n_prompt=4, head="mlp", loss_impl="chunked", pool="sequence",
                              adversary="grl")
