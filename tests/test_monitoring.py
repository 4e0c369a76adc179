"""Watching the adversary: the summary's domain alignment on held-out records (the head's
accuracy, a fresh probe's, the fooled-head warning) and the TensorBoard copy of the metrics."""
import json
import math

import pytest
import torch
from runner import FAST

from prada_fast.trainer.evaluation import domain_alignment, fooled


class _Features(torch.nn.Module):
    """A stand-in model: pooled features given per example, a fixed linear head."""

    def __init__(self, feats, head_weight):
        super().__init__()
        self.feats = feats
        self.domain_head = torch.nn.Module()
        self.domain_head.out = torch.nn.Linear(feats.shape[1], head_weight.shape[0], bias=False)
        self.domain_head.out.weight.data.copy_(head_weight)
        self.domain_head.forward = self.domain_head.out.forward

    def forward(self, input_ids, attention_mask, labels, domain_labels, *, features_only=False):
        assert features_only
        f = self.feats[input_ids[:, 0]]
        return f, self.domain_head(f)

    def layer_pooled_features(self, input_ids, attention_mask, labels):
        """Two "layers": noise that carries no domain, then the features."""
        f = self.feats[input_ids[:, 0]]
        noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(int(input_ids[0, 0])))
        return torch.stack([noise, f])


def test_domain_alignment_reports_a_fooled_head_and_a_probe_that_still_separates():
    """Features that separate D = 3 domains perfectly, and a head that maps each domain to
    the next one: head accuracy 0, fresh probe 1.0."""
    D, per, H = 3, 12, 7
    y = torch.arange(D).repeat_interleave(per)
    centres = torch.randn(D, H) * 5
    feats = centres[y] + 0.1 * torch.randn(len(y), H)
    head = torch.roll(centres, 1, 0)  # class c's centre scores highest for class c + 1
    model = _Features(feats, head)
    ids = torch.arange(len(y)).unsqueeze(1)
    batches = [{"input_ids": ids[s:s + 10], "attention_mask": torch.ones(len(ids[s:s + 10]), 1),
                "labels": ids[s:s + 10], "domain_labels": y[s:s + 10]} for s in range(0, len(y), 10)]
    a = domain_alignment(model, batches, layers=True)
    assert a["head_accuracy"] == 0.0 and a["probe_accuracy"] == 1.0
    assert a["layer_probe_accuracy"][1] == 1.0 and a["layer_probe_accuracy"][0] < 0.7  # chance 1/3
    assert a["chance"] == pytest.approx(1 / 3) and a["ln_domains"] == pytest.approx(math.log(3))
    assert fooled(a, final_dom_loss=1.5)          # below chance, loss above ln 3
    assert not fooled(a, final_dom_loss=1.0)      # below chance, but the loss is not above ln 3
    assert not fooled({**a, "head_accuracy": 0.4}, 1.5)
    assert not fooled(a, None)                    # no domain loss trained


def test_fooled_needs_evidence_beyond_noise():
    """The warning fires only where a head at chance would score this low with p < 1 %: the
    default main job's 0.234 over 64 records against chance 0.25 (L_dom 1.400 > ln 4) is
    noise; 0.10 over 64 is not, nor 0 over 21 at chance 1/3; the binomial tail matches
    torch's Binomial in float64 at odd sizes."""
    from prada_fast.trainer.evaluation import below_chance_p
    noise = {"head_accuracy": 15 / 64, "chance": 0.25, "ln_domains": math.log(4), "records": 64}
    assert not fooled(noise, final_dom_loss=1.400)
    assert fooled({**noise, "head_accuracy": 6 / 64}, final_dom_loss=1.400)
    assert not fooled({**noise, "head_accuracy": 6 / 64}, final_dom_loss=1.38)   # loss below ln 4
    assert not fooled({**noise, "head_accuracy": 6 / 64, "records": 0}, final_dom_loss=1.5)
    third = {"head_accuracy": 0.0, "chance": 1 / 3, "ln_domains": math.log(3), "records": 21}
    assert fooled(third, 1.2) and not fooled({**third, "records": 9}, 1.2)  # (2/3)^9 = 0.026
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for _ in range(5):
        n = int(torch.randint(3, 200, (1,), generator=g))
        k = int(torch.randint(0, n, (1,), generator=g))
        chance = float(torch.rand(1, generator=g, dtype=torch.float64)) * 0.8 + 0.1
        dist = torch.distributions.Binomial(n, torch.tensor(chance, dtype=torch.float64))
        ref = float(dist.log_prob(torch.arange(k + 1, dtype=torch.float64)).exp().sum())
        assert below_chance_p(k, n, chance) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_summary_alignment_tensorboard_and_layer_probes(in_process, tmp_path, monkeypatch):
    """A short run: summary.json carries the head's and a fresh probe's accuracy on the
    held-out pooled question features, --probe-every writes their curve, every metrics.jsonl
    value is in TensorBoard, and layers.py probes every layer of the finished run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    code = in_process([*FAST, "--teacher", "none", "--max-steps", "3", "--eval-per-domain", "10",
                       "--output-dir", str(out), "--report-to", "tensorboard",
                       "--prompt-encoder", "mlp", "--adversary", "confusion", "--probe-every", "2",
                       "--prompt-init", "vocab"])
    assert code == 0
    assert json.loads((out / "final" / "prada_config.json").read_text())["prompt_init"] == "vocab"
    summary = json.loads((out / "summary.json").read_text())
    a = summary["domain_alignment"]
    assert 0 <= a["probe_accuracy"] <= 1 and 0 <= a["head_accuracy"] <= 1
    assert a["probe_accuracy"] == summary["domain_probe_accuracy"]
    assert a["head_accuracy"] == summary["domain_classifier_accuracy"]
    assert a["chance"] == pytest.approx(0.25) and a["final_dom_loss"] > 0
    assert a["fooled"] == fooled(a, a["final_dom_loss"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "ce", "dom", "dom_acc", "grl_lambda"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in rows], key
    # --probe-every 2: the curve at steps 2 and 3 (the last); at the last step the model is the
    # exported one, so the head's and the probe's accuracy equal the summary's (other code path:
    # the reloaded final/ model, evaluation.domain_alignment)
    probed = [r for r in rows if "probe_acc" in r]
    assert [r["step"] for r in probed] == [2, 3]
    assert probed[-1]["probe_head_acc"] == pytest.approx(a["head_accuracy"], abs=1e-6)
    assert probed[-1]["probe_acc"] == pytest.approx(a["probe_accuracy"], abs=1e-6)
    got = [(e.step, e.value) for e in events.Scalars("train/probe_acc")]
    assert got == [(r["step"], pytest.approx(r["probe_acc"], abs=1e-7)) for r in probed]
    acc = events.Scalars("eval/accuracy/sorting")
    assert [e.value for e in acc] == [pytest.approx(summary["domains"]["sorting"]["accuracy_after"])]
    assert events.Scalars("eval/domain_probe_accuracy")[0].value == pytest.approx(a["probe_accuracy"])

    # where the domain lives: a probe per layer of the same run (layers.py)
    from prada_fast.experiments.analysis import domain_variance_share, pooled_features
    from prada_fast.experiments.layers import layer_probes, table
    from prada_fast.models import PradaModel
    per_layer, y, domains, _ = pooled_features(out, all_layers=True)
    final, y2, _, _ = pooled_features(out)
    model, tok, _ = PradaModel.from_final(out / "final", attn="sdpa")
    assert per_layer.shape[0] == model.student.config.num_hidden_layers + 1 and torch.equal(y, y2)
    torch.testing.assert_close(per_layer[-1], final)  # the last layer: the head's input
    res = layer_probes(out)
    assert [r["layer"] for r in res["layers"]] == list(range(len(per_layer)))
    assert all(0 <= r["logistic"] <= 1 and 0 <= r["ncm"] <= 1 for r in res["layers"])
    assert [r["domain_share"] for r in res["layers"]] == \
        [pytest.approx(domain_variance_share(f, y)) for f in per_layer]
    assert res["chance"] == pytest.approx(1 / len(domains)) and res["n"] == len(y)
    sub = res["head_subspace"]  # a linear head of rank D - 1 or D
    assert sub["rank"] in (len(domains) - 1, len(domains)) and 0 <= sub["outside"] <= 1
    assert table([res]).count("\n| ") == len(per_layer) + 1 + 2  # header rule, layers, subspaces

    # the same weights read as pooling layer P (--pool-layer P): the head-subspace probe gets
    # the head's input (the hook's features, analysis.head_input), not the final features
    import shutil

    from prada_fast.experiments import layers as layers_mod
    from prada_fast.experiments.analysis import head_input
    n_layers = model.student.config.num_hidden_layers
    seen, real = [], layers_mod.head_subspace
    monkeypatch.setattr(layers_mod, "head_subspace",
                        lambda d, f, y, **kw: seen.append(f) or real(d, f, y, **kw))
    for pool in (1, n_layers):
        other = tmp_path / f"pool{pool}"
        shutil.copytree(out, other)
        meta = json.loads((other / "final" / "prada_config.json").read_text())
        (other / "final" / "prada_config.json").write_text(json.dumps({**meta, "pool_layer": pool}))
        hooked = pooled_features(other)[0]  # the model's own pooling, through its hook
        assert not torch.allclose(hooked, per_layer[-1])
        torch.testing.assert_close(head_input(other, per_layer), hooked)
        layers_mod.layer_probes(other)
        torch.testing.assert_close(seen.pop(), hooked)


def test_split_by_rows_projects_onto_the_heads_row_space():
    """split_by_rows against a float64 least-squares projection: the parts add up, the first
    lies in the rows' span, the second is orthogonal to every row (a rank-deficient head too)."""
    from prada_fast.experiments.layers import split_by_rows
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 11, generator=g, dtype=torch.float64)
    w = torch.randn(5, 11, generator=g, dtype=torch.float64)
    w[4] = w[0] - 2 * w[2]                                   # rank 4
    inside, outside = split_by_rows(x.float(), w.float())
    coef = torch.linalg.lstsq(w.T, x.T).solution             # x ~ coef^T w
    torch.testing.assert_close(inside, (w.T @ coef).T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inside + outside, x, atol=1e-6, rtol=1e-6)
    assert (outside @ w.T).abs().max() < 1e-5

