"""--domain-steps K (trainer/domain_steps.py): the domain head's own AdamW updates against a
hand-written float64 AdamW, the student's gradient unchanged by taking the head out of the
student's optimizer (float64), exact resume, identical heads on two ranks, and mmd refused."""
import json

import pytest
import torch
from runner import FAST, REPO, assert_same_losses, metrics, train

from prada_fast import train as train_cli
from prada_fast.data import Collator
from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
from prada_fast.models.prada import DomainHead
from prada_fast.trainer.checkpoint import RANK_STATE
from prada_fast.trainer.domain_steps import HeadSteps
from prada_fast.trainer.packing import PackedCollator

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.05


def _hand_grads(head: DomainHead, pooled) -> list[torch.Tensor]:
    """d/dtheta of mean_m mean_b CE(head(f_mb), d_mb), written out (float64)."""
    W = head.out.weight.detach()
    grads = {n: torch.zeros_like(p) for n, p in head.named_parameters()}
    for f, d in pooled:
        x = f
        if head.kind == "mlp":
            pre = f @ head.inner.weight.detach().T + head.inner.bias.detach()
            x = pre.clamp_min(0)
        c = x @ W.T + head.out.bias.detach()
        dc = torch.softmax(c, 1)
        dc[torch.arange(len(d)), d] -= 1
        dc /= len(d) * len(pooled)
        grads["out.weight"] += dc.T @ x
        grads["out.bias"] += dc.sum(0)
        if head.kind == "mlp":
            dpre = (dc @ W) * (pre > 0)
            grads["inner.weight"] += dpre.T @ f
            grads["inner.bias"] += dpre.sum(0)
    return [grads[n] for n, _ in head.named_parameters()]


class HandAdamW:
    """torch.optim.AdamW's update, written out: decoupled decay, bias-corrected moments."""

    def __init__(self, params):
        self.p = [p.detach().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.t = 0

    def step(self, grads, lr):
        self.t += 1
        (b1, b2), t = BETAS, self.t
        for p, m, v, g in zip(self.p, self.m, self.v, grads):
            p.mul_(1 - lr * WD)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            p.sub_(lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + EPS))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_updates_equal_a_hand_written_float64_adamw(kind, k):
    """Three student steps, each K updates on that step's features (two micro-batches of odd,
    unequal sizes: a mean over all sequences instead of over micro-batches would differ), at
    a scheduled lr x the multiplier."""
    H, D, mult = 13, 3, 3.0
    head = DomainHead(H, D, kind, mlp_hidden=7).double()
    ref = DomainHead(H, D, kind, mlp_hidden=7).double()
    ref.load_state_dict(head.state_dict())
    steps = HeadSteps(head, k, lr_mult=mult, device="cpu", betas=BETAS, eps=EPS, weight_decay=WD)
    hand = HandAdamW(ref.parameters())
    for lr in (0.01, 0.03, 0.02):
        pooled = [(torch.randn(n, H, dtype=torch.float64) * 2, torch.randint(0, D, (n,))) for n in (5, 2)]
        steps.step(pooled, lr)
        for _ in range(k):
            with torch.no_grad():
                for p, q in zip(ref.parameters(), hand.p):
                    p.copy_(q)
            hand.step(_hand_grads(ref, pooled), lr * mult)
        for (name, p), q in zip(head.named_parameters(), hand.p):
            assert not p.requires_grad
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12, msg=name)
    assert steps.optimizer.state[steps.params[0]]["step"] == 3 * k


def _models(kind: str, adversary: str):
    """The same PRADA model twice (float64): the head trained jointly (K = 0), and released
    to HeadSteps (K >= 1)."""
    config = PradaConfig(n_domains=3, n_prompt=3, head=kind, mlp_hidden=9, loss_impl="chunked",
                         adversary=adversary)
    joint = PradaModel(load_causal_lm("tiny", seed=5)[0], config).double()
    apart = PradaModel(load_causal_lm("tiny", seed=5)[0], config).double()
    apart.load_state_dict(joint.state_dict())
    HeadSteps.release(apart, 2, {}, 10.0, "cpu")
    return joint, apart


def _batch(packed: bool, n_prompt: int) -> dict:
    examples = []
    for i in range(5):
        L = int(torch.randint(7, 19, ()))
        ids = torch.randint(3, 259, (L,)).tolist()
        q = int(torch.randint(2, L - 2, ()))
        # the second one is unlabelled (a target-domain record): only its question pools
        labels = [-100] * L if i == 1 else [-100] * q + ids[q:]
        examples.append({"input_ids": ids, "labels": labels, "domain": i % 3})
    batch = PackedCollator(0, n_prompt, 24 + n_prompt)(examples) if packed else Collator(0)(examples)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "domain_labels",
                                                      "position_ids", "seq_index")}


def _grads(model, batch, lam) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    loss, parts = model(**batch, adv_lambda=lam, keep_pooled=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, parts


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("adversary", ["grl", "confusion"])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_student_gradient_is_the_joint_paths(kind, adversary, packed):
    """With the head released (K >= 1) the student's gradient is the K = 0 path's, the
    adversary's share through the head included; the head itself gets none. The pooled
    features kept for the head are those the domain term saw: the head's CE on them is
    the reported L_dom."""
    joint, apart = _models(kind, adversary)
    batch = _batch(packed, 3)
    want, _ = _grads(joint, batch, 0.7)
    got, parts = _grads(apart, batch, 0.7)
    head = {n for n in want if n.startswith("domain_head.")}
    assert head and all(want[n].abs().sum() > 0 for n in head)  # the joint head learns
    assert set(got) == set(want) - head  # the released head gets nothing from the student's loss
    assert all(not p.requires_grad for p in apart.domain_head.parameters())
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-13, msg=name)
    no_adv, _ = _grads(apart, batch, 0.0)  # the adversary's gradient is in there
    assert not torch.allclose(no_adv["soft_prompt"], got["soft_prompt"], rtol=1e-6, atol=0)
    f, d = parts["pooled"]
    assert not f.requires_grad and f.shape == (len(d), apart.student.config.hidden_size)
    dom = torch.nn.functional.cross_entropy(apart.domain_head(f), d)
    torch.testing.assert_close(dom, parts["dom"].to(dom.dtype), rtol=1e-12, atol=1e-12)


def _ds_config(tmp_path, micro: int, accum: int, ranks: int = 1):
    """zero3.json at a constant lr (no scheduler: every step moves the head), with gradient
    accumulation, every tensor partitioned."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg.pop("scheduler")
    cfg.update(train_batch_size=micro * accum * ranks, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=accum)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _fast(**values) -> list[str]:
    """FAST with some flags' values replaced."""
    args = list(FAST)
    for name, value in values.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = value
    return args


# no teacher, no held-out records, a constant lr and adversary from the first step
SMALL = [*_fast(data="synthetic:24", eval_per_domain="0"), "--teacher", "none", "--lr", "0.005",
         "--lambda-schedule", "constant", "--domain-steps", "2"]


@pytest.mark.slow
def test_resume_continues_with_identical_losses(tmp_path, in_process, capsys):
    """K = 2, the linear head in the op, GRL, packed rows, two micro-batches per step: a
    run stopped after 2 steps and resumed logs the losses of one run straight through (the
    head and its AdamW state come back from the checkpoint). In this process (a world of
    one): three runs without three start-ups."""
    common = [*SMALL, "--ds", _ds_config(tmp_path, 3, 2), "--max-steps", "4", "--save-every", "2",
              "--adversary", "grl", "--no-progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert in_process([*common, "--output-dir", str(full)]) == 0
    assert in_process([*common, "--output-dir", str(part), "--stop-after", "2"]) == 0
    assert (part / "checkpoints" / "step2" / RANK_STATE.format(rank=0)).is_file()
    assert in_process([*common, "--output-dir", str(part), "--resume"]) == 0
    assert_same_losses(metrics(full), metrics(part), 4, ("loss", "ce", "dom", "dom_acc", "lr"))
    a, b = (torch.load(d / "checkpoints" / "step4" / RANK_STATE.format(rank=0), weights_only=True)
            for d in (full, part))
    for name, p in a["domain_head"]["head"].items():
        torch.testing.assert_close(b["domain_head"]["head"][name], p, rtol=1e-6, atol=1e-7)
    # resuming it with the head back in DeepSpeed's optimizer is refused, in one line
    capsys.readouterr()
    assert in_process([*common, "--output-dir", str(part), "--resume", "--max-steps", "6",
                       "--domain-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume with the same --domain-steps" in err[0], err


@pytest.mark.slow
def test_two_ranks_keep_one_head(tmp_path, cache):
    """2 ranks under ZeRO-3 (gloo), the MLP head, confusion, padded batches, accumulation:
    after the steps both ranks hold the same head and AdamW state (each saw its own data;
    the gradients were averaged), and that is the head DIR/final exports."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    train([*SMALL, "--ds", _ds_config(tmp_path, 2, 2, ranks=2), "--max-steps", "3", "--no-packing",
           "--domain-head", "mlp", "--mlp-hidden", "16", "--adversary", "confusion",
           "--output-dir", str(out)], cache, nproc=2)
    s0, s1 = (torch.load(out / "checkpoints" / "step3" / RANK_STATE.format(rank=r), weights_only=True)
              ["domain_head"] for r in (0, 1))
    final = load_file(out / "final" / "prada_heads.safetensors")
    for name, p in s0["head"].items():
        assert torch.equal(p, s1["head"][name]), name
        assert torch.equal(p, final[f"domain_head.{name}"]), name
    for i, st in s0["optimizer"]["state"].items():
        assert st["step"] == 6  # 3 steps x K = 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], s1["optimizer"]["state"][i][key]), (i, key)
            assert st[key].abs().sum() > 0


def test_mmd_with_domain_steps_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    code = train_cli.main(["--output-dir", str(tmp_path / "run"), "--adversary", "mmd",
                           "--domain-steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --domain-steps 2") and "--adversary mmd" in err[0], err
    assert not (tmp_path / "run").exists()


def test_compare_passes_it_to_the_adversarial_arms(tmp_path):
    from prada_fast.experiments.compare.flags import parse_args
    from prada_fast.experiments.compare.runs import trainer_args
    from prada_fast.experiments.compare.tuning import _tag
    from prada_fast.experiments.compare.variants import VARIANT_KEYS, variants
    for k in (0, 3):
        args = parse_args(["--output-dir", str(tmp_path), "--data", "synthetic:48", "--domain-steps", str(k),
                           "--variants", ",".join(VARIANT_KEYS)])
        V = variants(args.prompt_len)
        for key in VARIANT_KEYS:
            cmd = trainer_args(args, "sorting", V[key], 0)
            steps = cmd[cmd.index("--domain-steps") + 1] if "--domain-steps" in cmd else None
            assert steps == (str(k) if k and V[key].trains_domain_head else None), (k, key, cmd)
        knobs = {"lambda_max": 1.0, "head_lr_mult": 10.0, "domain_steps": k, "prompt_encoder": "none",
                 "lm_weight": 1.0}
        assert _tag(knobs, V["grl"]).endswith("-d3" if k else "-mult10")
