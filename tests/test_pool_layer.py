"""The adversary on an intermediate layer (`--pool-layer L`, issue 26): the domain term
pools decoder layer L's output, equal to a float64 reference from transformers' own
hidden states; its gradient reaches layers up to L and no further; packed = padded; a
layer the student lacks is refused; the setting survives the export."""
import pytest
import torch

from prada_fast.data.format import Collator
from prada_fast.models import ModelError, PradaConfig, PradaModel, load_causal_lm

from test_packing import PAD, examples, padded_and_packed, rel


def _model(seed, layer, adversary="confusion", dtype=torch.float32, head="linear"):
    student, _ = load_causal_lm("tiny", seed=seed % 1000)  # 3 decoder layers
    cfg = PradaConfig(n_domains=4, n_prompt=3, loss_impl="chunked", adversary=adversary,
                      pool_layer=layer, head=head)
    return PradaModel(student, cfg).to(dtype)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_domain_term_pools_the_layer_a_float64_reference_pools(seed, layer):
    g = torch.Generator().manual_seed(seed)
    model = _model(seed, layer, dtype=torch.float64)
    b = Collator(PAD)(examples(g, 6, hi=29))
    _, parts = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"], adv_lambda=0.4)
    emb, mask = model.embed(b["input_ids"], b["attention_mask"])
    states = model.backbone(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True,
                            use_cache=False).hidden_states[layer]
    pool = model.pool_mask(b["attention_mask"], b["labels"]).double()
    f = (states * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)
    logits = f @ model.domain_head.out.weight.T + model.domain_head.out.bias
    ref = torch.nn.functional.cross_entropy(logits, b["domain_labels"]).detach()
    assert float(parts["dom"]) == pytest.approx(float(ref), rel=1e-10)
    f_only, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"],
                      features_only=True)
    assert rel(f_only, f) < 1e-12


@pytest.mark.parametrize("adversary", ["grl", "confusion"])
def test_the_adversary_reaches_the_layers_up_to_l_only(seed, adversary):
    """No labelled token: the loss is the domain term alone. Layer 1's features: layer 0
    (the first decoder layer) and the embeddings get its gradient, layers 2 and 3 none."""
    g = torch.Generator().manual_seed(seed)
    model = _model(seed, 1, adversary)
    exs = examples(g, 5, hi=21)
    for e in exs:
        e["labels"], e["n_labels"] = [-100] * len(e["labels"]), 0
    b = Collator(PAD)(exs)
    loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"], adv_lambda=0.7)
    loss.backward()
    layers = model.backbone.layers
    assert all(float(p.grad.abs().sum()) > 0 for p in layers[0].parameters())
    assert float(model.soft_prompt.grad.abs().sum()) > 0
    for later in layers[1:]:
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in later.parameters())


def test_packed_equals_padded_on_an_intermediate_layer(seed):
    g = torch.Generator().manual_seed(seed)
    model = _model(seed, 2, head="mlp")
    exs = examples(g, 9, hi=33)
    (l_pad, p_pad, g_pad), (l_pack, p_pack, g_pack) = padded_and_packed(model, exs, 40, adv_lambda=0.6)
    d_pad, d_pack = p_pad["dom"], p_pack["dom"]
    assert rel(l_pack, l_pad) < 1e-5 and abs(d_pack - d_pad) <= 1e-5 * d_pad
    assert g_pad.keys() == g_pack.keys()
    for k in g_pad:
        assert rel(g_pack[k], g_pad[k]) < 1e-5, k


def test_a_layer_the_student_lacks_is_refused_and_the_export_keeps_it(tmp_path):
    with pytest.raises(ModelError, match="pool layer 4: the student has 3 decoder layers"):
        _model(0, 4)
    cfg = PradaConfig(n_domains=2, pool_layer=2)
    assert PradaConfig.from_meta({**cfg.to_meta(), "domains": ["a", "b"]}).pool_layer == 2
    older = {"domains": ["a", "b"], "domain_head": "linear", "n_prompt": 0}  # no pool_layer key
    assert PradaConfig.from_meta(older).pool_layer is None


def test_every_layers_pooled_features_are_what_pool_layer_pools(seed):
    """layer_pooled_features (the per-layer probes' input, one forward with every hidden
    state) equals, layer by layer, the domain features of a model pooling that layer through
    its hook (--pool-layer L), and its last layer the final features; float64, odd sizes."""
    g = torch.Generator().manual_seed(seed)
    b = Collator(PAD)(examples(g, 5, hi=23))
    torch.manual_seed(seed)  # the same soft prompt and head in every model built here
    every = _model(seed, None, dtype=torch.float64).layer_pooled_features(
        b["input_ids"], b["attention_mask"], b["labels"])
    assert every.shape == (4, 5, 128)  # the embeddings and 3 decoder layers
    for layer in (0, 1, 2, None):
        torch.manual_seed(seed)
        f, _ = _model(seed, layer, dtype=torch.float64)(
            b["input_ids"], b["attention_mask"], b["labels"], b["domain_labels"], features_only=True)
        assert rel(every[3 if layer is None else layer], f) < 1e-12, layer
    assert rel(every[0], every[3]) > 0.1  # the layers differ: not one tensor compared with itself
