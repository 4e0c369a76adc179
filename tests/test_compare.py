"""The comparison experiment (`python -m prada_fast.experiments.compare`): its numbers
(aggregation over seeds, PCA, domain probes), the trainer commands it builds, and a tiny
end-to-end run of 3 arms x 2 seeds that must leave a complete report."""
import json
import math
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prada_fast.experiments.analysis import (
    aggregate,
    domain_variance_share,
    mean_curves,
    pca_2d,
    probe_accuracy,
)
from prada_fast.experiments.compare import parse_args, trainer_args, variants
from prada_fast.experiments.compare.runs import trainer_env

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_mean_and_sample_std():
    a = aggregate([0.25, 0.5, None, 0.75, 1.0])
    assert a["n"] == 4 and a["values"] == [0.25, 0.5, 0.75, 1.0]
    assert a["mean"] == pytest.approx(0.625)
    assert a["std"] == pytest.approx(float(np.std([0.25, 0.5, 0.75, 1.0], ddof=1)))
    assert a["std"] == pytest.approx(math.sqrt(0.3125 / 3))
    one = aggregate([0.4])
    assert one["mean"] == pytest.approx(0.4) and one["std"] == 0.0 and one["n"] == 1
    none = aggregate([None, None])
    assert none == {"mean": None, "std": None, "n": 0, "values": []}


def test_mean_curves_over_seeds_keep_common_steps():
    a = [{"step": 10, "ce": 2.0, "kd": 1.0, "dom": 1.0}, {"step": 20, "ce": 1.0, "kd": 0.5, "dom": 2.0}]
    b = [{"step": 10, "ce": 4.0, "kd": 3.0, "dom": 1.0}, {"step": 20, "ce": 3.0, "kd": 0.5, "dom": 2.0},
         {"step": 30, "ce": 9.0, "kd": 9.0, "dom": 9.0}]
    c = mean_curves([a, b])
    assert c["step"] == [10, 20]
    assert c["ce"]["mean"] == pytest.approx([3.0, 2.0])
    assert c["ce"]["std"] == pytest.approx([math.sqrt(2), math.sqrt(2)])
    assert c["kd"]["std"][1] == 0.0


# ----------------------------------------------------------------------------- PCA


def test_pca_matches_numpy_svd_and_finds_the_dominant_direction():
    rng = np.random.default_rng(1234)
    n, h = 300, 16
    u = rng.normal(size=h)
    u /= np.linalg.norm(u)
    v = rng.normal(size=h)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    x = (rng.normal(size=(n, 1)) * 10.0) * u + (rng.normal(size=(n, 1)) * 3.0) * v \
        + rng.normal(size=(n, h)) * 0.3 + 5.0  # an offset: PCA must centre
    coords, comps, ratio = pca_2d(torch.from_numpy(x))

    # independent computation: eigen-decomposition of the covariance matrix
    xc = x - x.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xc, rowvar=False))
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    for k in range(2):
        assert abs(abs(float(comps[k].numpy() @ evecs[:, k])) - 1) < 1e-8
        ref = xc @ evecs[:, k]
        sign = np.sign(ref @ coords[:, k].numpy())
        np.testing.assert_allclose(coords[:, k].numpy(), sign * ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ratio.numpy(), evals[:2] / evals.sum(), rtol=1e-8)
    # the planted directions are found (up to sign)
    assert abs(float(comps[0].numpy() @ u)) > 0.999
    assert abs(float(comps[1].numpy() @ v)) > 0.99
    assert ratio[0] > 0.85
    # deterministic sign: the largest-magnitude loading of each component is positive
    for k in range(2):
        assert comps[k][comps[k].abs().argmax()] > 0
    np.testing.assert_allclose(np.linalg.norm(comps.numpy(), axis=1), 1.0, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_domain_variance_share_is_the_r2_of_a_least_squares_fit_on_the_domain(seed):
    """Reference: regress the features on one-hot domain indicators (numpy lstsq, float64);
    the fitted rows are the domain means and the share is the explained sum of squares."""
    rng = np.random.default_rng(seed)
    n, h, d = int(rng.integers(9, 40)), int(rng.integers(3, 17)), int(rng.integers(2, 5))
    labels = np.concatenate([np.arange(d), rng.integers(0, d, n - d)])
    x = rng.normal(size=(n, h)) + rng.normal(scale=rng.uniform(0.1, 3), size=(d, h))[labels]
    onehot = np.eye(d)[labels]
    coef, *_ = np.linalg.lstsq(onehot, x, rcond=None)
    fitted = onehot @ coef
    ref = ((fitted - x.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    got = domain_variance_share(torch.from_numpy(x).float(), torch.from_numpy(labels))
    assert got == pytest.approx(ref, rel=1e-5)
    means = torch.from_numpy(rng.normal(size=(d, h)))[labels]  # every row at its domain's mean
    assert domain_variance_share(means, torch.from_numpy(labels)) == pytest.approx(1.0)
    centred = x - fitted  # the domain means coincide
    assert domain_variance_share(torch.from_numpy(centred), torch.from_numpy(labels)) == \
        pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        domain_variance_share(torch.from_numpy(x), torch.from_numpy(labels[:-1]))


def test_pca_rejects_too_few_rows():
    with pytest.raises(ValueError):
        pca_2d(torch.zeros(1, 4))


# ----------------------------------------------------------------------------- probes


def test_probes_separate_clusters_and_stay_near_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    D, per, H = 4, 30, 12
    labels = torch.arange(D).repeat_interleave(per)
    centres = torch.randn(D, H, generator=g) * 6
    separable = centres[labels] + torch.randn(D * per, H, generator=g)
    noise = torch.randn(D * per, H, generator=g)
    for kind in ("logistic", "ncm"):
        assert probe_accuracy(separable, labels, kind=kind) == 1.0
        assert probe_accuracy(noise, labels, kind=kind) < 0.5  # chance 0.25
    assert probe_accuracy(separable, torch.zeros(D * per, dtype=torch.long)) is None  # one class
    assert probe_accuracy(separable[:5], labels[:5]) is None  # fewer than 2 rows per class


# ----------------------------------------------------------------------------- commands


def test_trainer_commands_differ_only_in_the_variant_flags(tmp_path):
    from prada_fast.experiments.compare.variants import VARIANT_KEYS
    args = parse_args(["--output-dir", str(tmp_path), "--seeds", "0,1,2", "--extra", "--max-len 128",
                       "--lambda-max", "0.3", "--head-lr-mult", "10", "--prompt-encoder", "mlp",
                       "--lm-weight", "0.7", "--teacher-seed", "5",
                       "--data", "synthetic:48", "--variants", ",".join(VARIANT_KEYS)])
    assert args.targets == ["sorting"]
    default = parse_args(["--output-dir", str(tmp_path)])
    assert default.targets == ["market"]  # the story benchmark
    assert default.variants == ["cot", "cot-lm", "prada-confusion", "prada-confusion-lm"]  # (A)-(D)
    assert args.variants == list(VARIANT_KEYS)
    V = variants(args.prompt_len)
    for seed in args.seeds:
        cmds = {k: trainer_args(args, "sorting", V[k], seed) for k in args.variants}
        for k, cmd in cmds.items():
            out = cmd[cmd.index("--output-dir") + 1]
            assert out == str(tmp_path / "runs" / "sorting" / k / f"seed{seed}")
            # one teacher and one data set for every seed and variant: only --seed differs
            assert cmd[cmd.index("--teacher-fit-cache") + 1] == str(tmp_path / "teachers")
            assert cmd[cmd.index("--teacher-seed") + 1] == cmd[cmd.index("--data-seed") + 1] == "5"
            assert cmd[cmd.index("--seed") + 1] == str(seed)
            assert cmd[cmd.index("--target-domains") + 1] == "sorting"
            assert cmd[-2:] == ["--max-len", "128"]
            if k.endswith("-lm"):
                assert cmd[cmd.index("--lm-weight") + 1] == "0.7"
            else:
                assert "--lm-weight" not in cmd
        for k in ("cot", "cot-lm"):
            assert "--no-domain-loss" in cmds[k] and "--adversary" not in cmds[k]
            assert "--lambda-max" not in cmds[k]
        pl = {k: c[c.index("--prompt-len") + 1] for k, c in cmds.items()}
        assert pl == {k: "8" if k.startswith("prada") else "0" for k in VARIANT_KEYS}
        for k in VARIANT_KEYS[2:]:
            c = cmds[k]
            assert "--no-domain-loss" not in c
            assert c[c.index("--adversary") + 1] == k.removeprefix("prada-").removesuffix("-lm")
            assert c[c.index("--lambda-max") + 1] == "0.3"
            assert c[c.index("--domain-head-lr-mult") + 1] == "10.0"
            assert ("--prompt-encoder" in c) == k.startswith("prada")

        def common(c):
            c = list(c)
            for flag in ("--output-dir", "--prompt-len", "--adversary", "--lambda-max",
                         "--domain-head-lr-mult", "--prompt-encoder", "--lm-weight"):
                if flag in c:
                    i = c.index(flag)
                    del c[i:i + 2]
            return [x for x in c if x != "--no-domain-loss"]
        assert len({tuple(common(c)) for c in cmds.values()}) == 1
    # the old behaviour: each seed its own data and teacher (no --teacher-seed, --data-seed)
    old = parse_args(["--output-dir", str(tmp_path), "--teacher-per-seed", "--data", "synthetic:48"])
    cmd = trainer_args(old, "sorting", V["cot"], 3)
    assert "--teacher-seed" not in cmd and "--data-seed" not in cmd


def test_a_shared_teacher_seed_gives_every_student_seed_the_same_data_and_teacher():
    """The trainer's --data-seed and --teacher-seed (what compare passes): runs of different
    --seed hold out the same records and fit the same auto teacher (its cache key is a hash
    of the training examples and the teacher's seed); unset, both follow --seed as before."""
    from prada_fast.data.prepare import load_run_data
    from prada_fast.trainer import settings
    from prada_fast.trainer.flags import build_parser
    p = build_parser()

    def run(*argv):
        a = p.parse_args(["--data", "synthetic:11", "--eval-per-domain", "3", *argv])
        d = load_run_data(settings.data_settings(a))
        spec = settings.teacher_spec(a)
        train = [(r.question, r.answer, r.domain) for r in d.train_records]
        return [(r.question, r.domain) for r in d.eval_records], train, spec.seed
    shared = [run("--seed", str(s), "--data-seed", "4", "--teacher-seed", "4") for s in (0, 9)]
    assert shared[0] == shared[1] and shared[0][2] == 4
    own = [run("--seed", str(s)) for s in (0, 9)]
    assert own[0][2] == 0 and own[1][2] == 9
    assert own[0][0] != own[1][0] and own[0][1] != own[1][1]
    assert own[0] == run("--seed", "0", "--data-seed", "0", "--teacher-seed", "0")


def test_tuning_never_sees_the_target_and_picks_the_best_pseudo_target_setting(tmp_path, monkeypatch):
    """--tune: every tuning run trains on the sources minus the pseudo-target, with the
    pseudo-target unlabelled and the real target absent; the chosen knobs are those with the
    best pseudo-target accuracy (the LM weight on CoT + LM, adversary knobs on the
    adversarial-only variant, then the prompt encoder on PRADA; PRADA + LM takes both)."""
    from prada_fast.experiments.compare import tuning as cmp
    from prada_fast.experiments.compare.variants import VARIANT_KEYS
    args = parse_args(["--output-dir", str(tmp_path), "--data", "synthetic:8:shopping,travel,recipes,garden",
                       "--targets", "garden", "--tune", "--tune-lambdas", "0.1,1",
                       "--tune-head-mults", "1,10", "--tune-prompt-encoders", "none,mlp",
                       "--tune-lm-weights", "1,0.3,3", "--tune-seeds", "7,8",
                       "--variants", ",".join(VARIANT_KEYS)])
    # a made-up pseudo-target accuracy per setting; the seeds average it
    score = {("grl", 0.1, 1.0): 0.3, ("grl", 1.0, 10.0): 0.35, ("confusion", 1.0, 1.0): 0.4}
    enc_bonus = {("grl", "mlp"): 0.05, ("confusion", "none"): 0.02}
    lm_score = {"0.3": 0.5, "3.0": 0.45}
    seen, how = [], []

    def fake_run(args_, argv, d, tag, walls, alone=False):
        if (d / "summary.json").is_file():
            return "reused", None
        seen.append(argv)
        how.append(alone)
        get = lambda f, default=None: argv[argv.index(f) + 1] if f in argv else default  # noqa: E731
        adv = get("--adversary")
        key = (adv, float(get("--lambda-max", 0)), float(get("--domain-head-lr-mult", 0)))
        acc = score.get(key, 0.1) + enc_bonus.get((adv, get("--prompt-encoder")), 0.0)
        if adv is None and "--lm-weight" in argv:
            acc = lm_score.get(get("--lm-weight"), 0.2)
        acc += 0.01 * (int(get("--seed")) - 7.5)  # seed noise that averages out
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"domains": {
            "recipes": {"accuracy_after": acc}, "shopping": {"accuracy_after": 0.8},
            "travel": {"accuracy_after": 0.7}}}))
        return "trained", 1.0

    monkeypatch.setattr(cmp, "ensure_run", fake_run)
    monkeypatch.setattr(cmp, "finished", lambda d: (d / "summary.json").is_file())
    monkeypatch.setattr(cmp, "data_domains", lambda specs: ["garden", "recipes", "shopping", "travel"])
    assert args.jobs == 2 and args.teacher == "auto"
    chosen = cmp.tune(args, "garden", [])
    # cot, 3 LM weights, 4 settings x 2 adversaries, 2 encoders x 2 PRADA variants; each on 2
    # seeds, each trained once: the first alone (it fits the tuning split's teacher), the others
    # two at a time (--jobs 2), stage by stage
    assert len(seen) == 2 * (1 + 3 + 4 * 2 + 2 * 2) == len({tuple(a) for a in seen})
    assert how[0] is True and not any(how[1:])
    assert "--no-domain-loss" in seen[0] and "--lm-weight" not in seen[0]  # the (A) reference
    for argv in seen:
        assert argv[argv.index("--target-domains") + 1] == "recipes"
        assert argv[argv.index("--source-domains") + 1] == "shopping,travel"
        assert str(tmp_path / "tune" / "garden") in argv[argv.index("--output-dir") + 1]
        assert int(argv[argv.index("--seed") + 1]) in (7, 8)
        assert argv[argv.index("--teacher-seed") + 1] == "0"  # one teacher for the tuning seeds
    base = {"lm_weight": 1.0, "domain_steps": 0}  # --domain-steps is passed on, not tuned
    assert chosen["cot-lm"]["lm_weight"] == 0.3
    assert chosen["grl"] == {**base, "lambda_max": 1.0, "head_lr_mult": 10.0, "prompt_encoder": "none"}
    assert chosen["confusion"] == {**base, "lambda_max": 1.0, "head_lr_mult": 1.0, "prompt_encoder": "none"}
    assert chosen["prada-grl"] == {**base, "lambda_max": 1.0, "head_lr_mult": 10.0, "prompt_encoder": "mlp"}
    assert chosen["prada-confusion"] == {**base, "lambda_max": 1.0, "head_lr_mult": 1.0,
                                         "prompt_encoder": "none"}
    for adv in ("grl", "confusion"):
        assert chosen[f"prada-{adv}-lm"] == {**chosen[f"prada-{adv}"], "lm_weight": 0.3}
    saved = json.loads((tmp_path / "tune" / "garden" / "chosen.json").read_text())
    assert saved["chosen"] == chosen and saved["pseudo_target"] == "recipes"
    # a grid of one is chosen without a tuning run; with --jobs 1 every run trains alone
    seen.clear()
    how.clear()
    args.jobs = 1
    args.output_dir = tmp_path / "one"
    args.tune_prompt_encoders = ["lstm"]
    args.tune_head_mults = [10.0]
    args.tune_lambdas = [0.3]
    args.tune_lm_weights = [2.0]
    args.report_only = False
    one = cmp.tune(args, "garden", [])
    assert one["prada-grl-lm"] == {"lambda_max": 0.3, "head_lr_mult": 10.0, "prompt_encoder": "lstm",
                                   "lm_weight": 2.0, "domain_steps": 0}
    assert len(seen) == 2 and all(how)  # only the cot reference, on 2 seeds
    # a repeated grid value is one run, trained once
    seen.clear()
    args.jobs, args.output_dir, args.tune_lambdas = 2, tmp_path / "twice", [0.3, 0.3]
    cmp.tune(args, "garden", [])
    assert len(seen) == 2 + 2 * 2  # the reference and one setting per adversary, on 2 seeds
    best = next(r for r in saved["tried"]
                if r["variant"] == "confusion" and r["knobs"] == chosen["confusion"])
    assert best["pseudo_target_accuracy"] == pytest.approx(0.4) and best["n_seeds"] == 2


@pytest.mark.parametrize("budget", [0.03, 0.2, 1.0])
def test_tuning_keeps_the_source_accuracy_within_the_budget(tmp_path, monkeypatch, budget, capsys, seed):
    """--tune-source-drop X: a setting whose source accuracy on the tuning split falls more than
    X below the (A) reference's is passed over; when every setting of a grid does, the one
    that costs the least is chosen; X = 1 leaves the pseudo-target accuracy alone to decide."""
    from prada_fast.experiments.compare import tuning as cmp
    from prada_fast.experiments.compare.report import tuning_lines
    rng = np.random.default_rng(seed)
    ref = float(rng.uniform(0.5, 0.7))  # (A)'s mean source accuracy on the tuning split
    # lambda -> (pseudo-target acc, source drop against (A)): the best pseudo-target setting
    # costs 0.15 of source accuracy; with the lr multiplier 1 every setting costs more than 0.1
    table = {(0.1, 10.0): (0.30, 0.01), (0.3, 10.0): (0.40, 0.10), (1.0, 10.0): (0.55, 0.15),
             (0.1, 1.0): (0.20, 0.12), (0.3, 1.0): (0.35, 0.25), (1.0, 1.0): (0.60, 0.30)}
    enc = {"none": (0.0, 0.0), "mlp": (0.2, 0.5)}  # the mlp encoder: better target, big cost

    def fake_run(args_, argv, d, tag, walls, alone=False):
        get = lambda f, default=None: argv[argv.index(f) + 1] if f in argv else default  # noqa: E731
        pa, drop = (0.25, 0.0)
        if get("--adversary"):
            pa, drop = table[(float(get("--lambda-max")), float(get("--domain-head-lr-mult")))]
            e_pa, e_drop = enc[get("--prompt-encoder", "none")]
            pa, drop = pa + e_pa, drop + e_drop
        src = ref - drop
        d.mkdir(parents=True, exist_ok=True)  # sources averaging src, whatever their split
        (d / "summary.json").write_text(json.dumps({"domains": {
            "recipes": {"accuracy_after": pa}, "shopping": {"accuracy_after": src - 0.05},
            "travel": {"accuracy_after": src + 0.05}}}))
        return "trained", 1.0

    monkeypatch.setattr(cmp, "ensure_run", fake_run)
    monkeypatch.setattr(cmp, "finished", lambda d: (d / "summary.json").is_file())
    monkeypatch.setattr(cmp, "data_domains", lambda specs: ["garden", "recipes", "shopping", "travel"])
    for lr_mults, want in (("10", {0.03: 0.1, 0.2: 1.0, 1.0: 1.0}),  # 0.03: only lambda 0.1 is within
                           ("1", {0.03: 0.1, 0.2: 0.1, 1.0: 1.0})):  # none within 0.03 or 0.1: least cost
        out = tmp_path / f"mult{lr_mults}"
        args = parse_args(["--output-dir", str(out), "--data", "synthetic:8:shopping,travel,recipes,garden",
                           "--targets", "garden", "--tune", "--tune-lambdas", "0.1,0.3,1",
                           "--tune-head-mults", lr_mults, "--tune-prompt-encoders", "none,mlp",
                           "--tune-seeds", "7", "--tune-source-drop", str(budget), "--jobs", "1",
                           "--variants", "prada-confusion"])  # the (A) reference trains anyway
        chosen = cmp.tune(args, "garden", [])["prada-confusion"]
        assert chosen["lambda_max"] == want[budget], (lr_mults, budget, chosen)
        # the mlp encoder adds 0.5 to the cost: chosen only without a limit
        assert chosen["prompt_encoder"] == ("mlp" if budget == 1.0 else "none")
        saved = json.loads((out / "tune" / "garden" / "chosen.json").read_text())
        assert saved["source_drop"] == budget
        assert saved["reference_source_accuracy"] == pytest.approx(ref)
        judged = {(r["variant"], r["knobs"]["lambda_max"], r["knobs"]["prompt_encoder"]):
                  r["within_source_budget"] for r in saved["tried"] if r["variant"] != "cot"}
        for (v, lam, e), within in judged.items():
            drop = (table[(lam, float(lr_mults))][1] if v == "confusion" else
                    table[(chosen["lambda_max"], float(lr_mults))][1]) + enc[e][1]
            assert within == (drop <= budget + 1e-9), (v, lam, e)
        log = capsys.readouterr().out
        assert ("no setting of confusion keeps the source accuracy" in log) == (
            lr_mults == "1" and budget < 0.12)
        text = "\n".join(tuning_lines(saved, "garden", {}))
        n_out = sum(not w for w in judged.values())
        assert (f"{n_out} of the {len(judged)} settings judged" in text) == (budget < 1)
        # with lr multiplier 1 and budget 0.03 both stages fall back: the adversary's and the encoder's
        fallbacks = 2 if lr_mults == "1" and budget < 0.12 else 0
        assert text.count("least costly: none within the budget") == fallbacks
        assert sum(r.get("least_costly", False) for r in saved["tried"]) == fallbacks
    # a setting without a finished run is never chosen for being within the budget
    from prada_fast.experiments.compare.tuning import _best
    rows = {0.1: (0.5, ref - 0.3), 0.3: (0.2, ref - 0.15), 1.0: (None, None)}
    grid = [{"lambda_max": lam} for lam in rows]

    def score(kn):
        pa, sa = rows[kn["lambda_max"]]
        return {"variant": "confusion", "pseudo_target_accuracy": pa, "source_accuracy": sa}
    assert _best(grid, score, ref, 0.03) == {"lambda_max": 0.3}  # none within: least costly
    assert _best(grid, score, ref, 0.2) == {"lambda_max": 0.3}
    assert _best(grid, score, ref, 1.0) == {"lambda_max": 0.1}


def test_a_run_is_finished_by_its_weights_or_by_the_record_of_its_summary(tmp_path):
    """finished(): summary.json and final/, or (weights dropped) a record whose digest is the
    summary's; a record cut short or made for another summary does not count."""
    import hashlib

    from prada_fast.experiments.compare.runs import FEATURES, finished
    d = tmp_path / "seed0"
    d.mkdir()
    assert not finished(d)
    (d / "summary.json").write_text('{"steps": 3}')
    assert not finished(d)
    (d / FEATURES).write_bytes(b"PK\x03\x04 cut short")
    assert not finished(d)
    digest = hashlib.sha256((d / "summary.json").read_bytes()).hexdigest()
    torch.save({"features": torch.zeros(2, 3), "summary_sha256": digest}, d / FEATURES)
    assert finished(d)
    (d / "summary.json").write_text('{"steps": 4}')  # another run's summary
    assert not finished(d)
    (d / "final").mkdir()
    (d / "final" / "prada_config.json").write_text("{}")
    assert finished(d)  # the weights are there: the record is made again from them


def test_a_record_made_with_other_probe_folds_is_remade_while_the_weights_are_there(
        tmp_path, monkeypatch, capsys):
    """features_of: a record whose head-subspace probes used other --probe-folds is made again
    from final/ when it is there; without the weights it is reused and named once."""
    import hashlib

    from prada_fast.experiments import layers
    from prada_fast.experiments.compare import runs
    d = tmp_path / "seed0"
    d.mkdir()
    (d / "summary.json").write_text('{"steps": 3}')
    digest = hashlib.sha256((d / "summary.json").read_bytes()).hexdigest()
    old = {"features": torch.zeros(2, 3), "head_subspace": {"folds": 3}, "probe_folds": 3,
           "summary_sha256": digest}
    torch.save(old, d / runs.FEATURES)

    def no_weights(*a, **k):
        raise AssertionError("made again without weights")
    monkeypatch.setattr(runs, "pooled_features", no_weights)
    for _ in range(2):
        assert runs.features_of(d, 5)["head_subspace"] == {"folds": 3}
    assert capsys.readouterr().out.count("--probe-folds 3, not 5") == 1
    assert runs.features_of(d, 3)["head_subspace"] == {"folds": 3}  # the same folds: reused

    (d / "final").mkdir()
    (d / "final" / "prada_config.json").write_text("{}")
    stack = torch.randn(4, 6, 3)
    monkeypatch.setattr(runs, "pooled_features",
                        lambda d, all_layers: (stack, torch.tensor([0, 1] * 3), ["a", "b"], {}))
    monkeypatch.setattr(layers, "head_subspace", lambda d, f, y, folds: {"folds": folds})
    assert runs.features_of(d, 3)["head_subspace"] == {"folds": 3}  # matches: not remade
    rec = runs.features_of(d, 5)
    assert rec["head_subspace"] == {"folds": 5} and rec["probe_folds"] == 5
    assert torch.equal(rec["features"], stack[-1])
    assert torch.load(d / runs.FEATURES)["probe_folds"] == 5  # kept


def test_the_record_takes_the_heads_input_from_the_one_pass_over_every_layer(tmp_path, monkeypatch):
    """head_input: the final row without --pool-layer, row P for a pool layer P below the
    last, and for P = L (the last layer before the final norm, not a row) the head's own
    pooling; layer_pooled_features' rows are the hook's tensors (test_pool_layer)."""
    from prada_fast.experiments import analysis
    layers = torch.randn(4, 5, 7)  # the embeddings and 3 decoder layers
    own = torch.randn(5, 7)
    monkeypatch.setattr(analysis, "pooled_features", lambda d: (own, None, None, None))
    (tmp_path / "final").mkdir()
    for pool, want in ((None, layers[3]), (0, layers[0]), (2, layers[2]), (3, own)):
        (tmp_path / "final" / "prada_config.json").write_text(json.dumps({"pool_layer": pool}))
        assert torch.equal(analysis.head_input(tmp_path, layers), want), pool


def test_paired_interval_is_the_t_interval():
    from prada_fast.experiments.compare import ci95
    d = [0.10, 0.02, 0.05, 0.08, -0.01]
    lo, hi = ci95(d)
    m, sd = np.mean(d), np.std(d, ddof=1)
    assert (lo + hi) / 2 == pytest.approx(m)
    assert (hi - lo) / 2 == pytest.approx(2.776 * sd / math.sqrt(5), rel=2e-4)  # t(0.975, 4)
    assert ci95([0.1]) is None


# Student's t, the printed tables: two-sided 95 % (df 1..30), and 97.5 % (Bonferroni for 2)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
T975 = {1: 25.452, 2: 6.205, 3: 4.177, 4: 3.495, 5: 3.163, 9: 2.685, 20: 2.423, 60: 2.299}


def test_t_quantiles_are_those_of_the_printed_tables():
    from prada_fast.experiments.compare.statistics import t_quantile
    for df, q in enumerate(T95, 1):
        assert t_quantile(0.95, df) == pytest.approx(q, abs=6e-4), df
    for df, q in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-4), df
    assert t_quantile(0.95, 2000) == pytest.approx(1.961, abs=1e-3)  # towards the normal's 1.960


def _fake_run(variant, seed, src, tgt, layers=None):
    """One run's record as collect_run leaves it (two sources, one target)."""
    return {"target": "t", "variant": variant, "seed": seed,
            "roles": {"s1": "source", "s2": "source", "t": "target"},
            "accuracy_after": {"s1": src[0], "s2": src[1], "t": tgt},
            "accuracy_before": {"s1": 0.0, "s2": 0.0, "t": 0.0}, "probe_accuracy": 0.5,
            "ncm_accuracy": 0.5, "domain_classifier_accuracy": 0.3, "final_loss": 1.0,
            "wall_seconds": 1.0, "tokens_per_s": 1.0, "final": {},
            "layer_probes_before": None if layers is None else layers[0],
            "layer_probes_after": None if layers is None else layers[1]}


def test_paired_intervals_against_a_and_b_and_the_verdict(seed):
    """7 seeds (t(0.975, 6) = 2.447): per arm the paired difference against (A) and (B) is
    the per-seed difference of the source mean and of the target, its t-interval computed
    here with numpy; PRADA's verdict is taken against (B) only: an arm planted well above
    (B) is "better", one planted below "worse", and (A) plays no part in it."""
    from prada_fast.experiments.compare.report import verdict_lines
    from prada_fast.experiments.compare.statistics import paired_differences, verdict
    rng = np.random.default_rng(seed)
    n = 7
    acc = {"cot": rng.uniform(0.2, 0.4, (n, 3))}
    acc["cot-lm"] = acc["cot"] + rng.normal(0.15, 0.02, (n, 3))  # (B) far above (A)
    acc["prada-confusion"] = acc["cot"] + rng.normal(0.05, 0.02, (n, 3))  # above (A), below (B)
    acc["prada-confusion-lm"] = acc["cot-lm"] + rng.normal(0.1, 0.01, (n, 3))  # above (B)
    seeds = rng.permutation(100)[:n].tolist()
    by = {k: [_fake_run(k, s, a[i, :2].tolist(), float(a[i, 2])) for i, s in enumerate(seeds)]
          for k, a in acc.items()}
    by["cot"] = by["cot"][::-1]  # pairing is by seed, not by position
    V = variants(8)
    for base in ("cot", "cot-lm"):
        got = paired_differences(by, base)
        assert set(got) == set(acc) - {base}
        for k, d in got.items():
            diff = acc[k] - acc[base]
            for name, ref in (("target_accuracy_after", diff[:, 2]),
                              ("source_accuracy_after", diff[:, :2].mean(1))):
                half = 2.447 * ref.std(ddof=1) / math.sqrt(n)
                assert d[name]["n"] == n and d[name]["mean"] == pytest.approx(ref.mean())
                assert d[name]["ci95"] == pytest.approx([ref.mean() - half, ref.mean() + half], rel=1e-3)
    v = verdict(paired_differences(by, "cot-lm"), V)
    assert set(v["arms"]) == {"prada-confusion", "prada-confusion-lm"}
    assert v["arms"]["prada-confusion"]["target"] == "worse"
    assert v["arms"]["prada-confusion-lm"]["target"] == "better" and v["helps"] is True
    for k, a in v["arms"].items():  # Bonferroni for 2 arms: the 97.5 % t-interval
        diff = acc[k][:, 2] - acc["cot-lm"][:, 2]
        half = 2.969 * diff.std(ddof=1) / math.sqrt(n)  # t(0.9875, 6)
        assert a["target_ci_adjusted"] == pytest.approx([diff.mean() - half, diff.mean() + half], rel=1e-3)
        assert a["seeds_above_equal_below"] == [(diff > 0).sum(), 0, (diff < 0).sum()]
    assert v["adjusted_level"] == 0.975 and v["helps_adjusted"] is True
    labels = {k: {"label": V[k].label} for k in V}
    assert v["lm_vs_plain"] is None and "against (A)" not in str(verdict_lines(v, labels))  # no (A) given
    vp = verdict(paired_differences(by, "cot-lm"), V, paired_vs_plain=paired_differences(by, "cot"))
    assert vp["lm_vs_plain"] == "better"  # (B) above (A): nothing to add to the verdict
    assert vp["arms"]["prada-confusion"]["vs_plain"] == "better"
    assert not any(x.startswith("But (B)") for x in verdict_lines(vp, labels))
    assert "; against (A): better [" in "\n".join(verdict_lines(vp, labels))
    del by["prada-confusion-lm"]
    assert verdict(paired_differences(by, "cot-lm"), V)["helps"] is False  # above (A) is not enough
    one = {k: r[:1] for k, r in by.items()}
    v1 = verdict(paired_differences(one, "cot-lm"), V)
    assert v1["helps"] is None and v1["helps_adjusted"] is None  # one seed: undecided
    text = "\n".join(verdict_lines(v1, {k: {"label": V[k].label} for k in V}))
    assert ": fewer than 2 paired seeds; seeds above / equal to / below (B): " in text
    assert "Verdict: undecided" in text and "Bonferroni" not in text


def test_beating_a_baseline_that_fell_below_plain_cot_is_said_so(seed):
    """Issue 26's protocol, its target questions right of 16 per seed: (B) fell below (A), (C)
    beats (B) at 95 % but not (A); the verdict says both (intervals computed here, t(0.975, 4)
    = 2.776). A seed order shuffled per arm checks that the pairing is by seed."""
    from prada_fast.experiments.compare.report import verdict_lines
    from prada_fast.experiments.compare.statistics import paired_differences, verdict
    right = {"cot": [9, 10, 12, 10, 12], "cot-lm": [8, 5, 8, 5, 7],
             "prada-confusion": [10, 8, 9, 11, 9], "prada-confusion-lm": [8, 9, 6, 4, 9]}
    rng = np.random.default_rng(seed)
    by = {k: [_fake_run(k, s, [0.5, 0.5], r[s] / 16) for s in rng.permutation(5)] for k, r in right.items()}
    V = variants(8)
    v = verdict(paired_differences(by, "cot-lm"), V, paired_vs_plain=paired_differences(by, "cot"))

    def ci(k, base):
        d = (np.array(right[k]) - np.array(right[base])) / 16
        half = 2.776 * d.std(ddof=1) / math.sqrt(5)
        return [d.mean() - half, d.mean() + half]
    assert v["lm_vs_plain"] == "worse"
    assert v["lm_vs_plain_ci95"] == pytest.approx(ci("cot-lm", "cot"), abs=2e-4)
    c, d = v["arms"]["prada-confusion"], v["arms"]["prada-confusion-lm"]
    assert c["target"] == "better"
    assert c["target_ci95"] == pytest.approx(ci("prada-confusion", "cot-lm"), abs=2e-4)
    assert c["vs_plain"] == "no difference shown"
    assert c["vs_plain_ci95"] == pytest.approx(ci("prada-confusion", "cot"), abs=2e-4)
    assert d["vs_plain"] == "worse" and d["target"] == "no difference shown"
    text = "\n".join(verdict_lines(v, {k: {"label": V[k].label} for k in V}))
    assert "Verdict: PRADA helps on this target." in text
    assert "But (B) is worse than (A) here ([-0.384, -0.116])" in text
    assert text.endswith("against (A), no PRADA arm is better.")


def test_an_arm_better_at_95_but_not_at_the_bonferroni_level_is_reported_so():
    """Δ target of (C) against (B) on 5 seeds in sixteenths of a question set: mean 0.075,
    t = 3.21, between t(0.975, 4) = 2.776 and t(0.9875, 4) = 3.495."""
    from prada_fast.experiments.compare.report import verdict_lines
    from prada_fast.experiments.compare.statistics import paired_differences, verdict
    base = [0.25, 0.3125, 0.1875, 0.25, 0.375]
    delta = {"prada-confusion": [0.0625, 0.125, 0.0, 0.125, 0.0625],
             "prada-confusion-lm": [-0.0625, 0.0, -0.125, 0.0625, 0.0]}
    by = {"cot-lm": [_fake_run("cot-lm", s, [0.5, 0.5], base[s]) for s in range(5)]}
    for k, dd in delta.items():
        by[k] = [_fake_run(k, s, [0.5, 0.5], base[s] + dd[s]) for s in range(5)]
    V = variants(8)
    v = verdict(paired_differences(by, "cot-lm"), V)
    c = v["arms"]["prada-confusion"]
    assert c["target"] == "better" and c["adjusted"] == "no difference shown"
    assert c["seeds_above_equal_below"] == [4, 1, 0]
    assert v["arms"]["prada-confusion-lm"]["seeds_above_equal_below"] == [1, 2, 2]
    assert v["helps"] is True and v["helps_adjusted"] is False
    text = "\n".join(verdict_lines(v, {k: {"label": V[k].label} for k in V}))
    assert "Bonferroni over the 2 PRADA arms (97.5 %): no difference shown" in text
    assert "seeds above / equal to / below (B): 4 / 1 / 0" in text
    assert "Verdict: PRADA helps on this target." in text
    assert "(Not at the Bonferroni level 97.5 % for 2 arms.)" in text
    del by["prada-confusion-lm"]  # one PRADA arm: its 95 % interval is the only one
    one = verdict(paired_differences(by, "cot-lm"), V)
    assert one["adjusted_level"] == 0.95 and one["helps_adjusted"] is True
    text = "\n".join(verdict_lines(one, {k: {"label": V[k].label} for k in V}))
    assert "Bonferroni" not in text and "4 / 1 / 0" in text
    # four arms planned (both adversaries), one with runs: still the level for four
    four = verdict(paired_differences(by, "cot-lm"), V, n_arms=4)
    assert four["adjusted_level"] == 0.9875 and four["arms"]["prada-confusion"]["adjusted"] == \
        "no difference shown"
    text = "\n".join(verdict_lines(four, {k: {"label": V[k].label} for k in V}))
    assert "Bonferroni over the 4 PRADA arms (98.75 %)" in text


def test_t_quantile_refuses_a_level_outside_0_1():
    from prada_fast.experiments.compare.statistics import t_quantile
    for level, df in ((1.0, 4), (1.5, 4), (0.0, 4), (float("nan"), 4), (0.95, 0)):
        with pytest.raises(ValueError):
            t_quantile(level, df)


def test_layer_probe_summary_is_the_mean_over_seeds_per_layer(seed):
    from prada_fast.experiments.compare.statistics import summarise
    rng = np.random.default_rng(seed)
    n, L = 5, 4  # 3 decoder layers + the embeddings
    before, after = rng.uniform(0.5, 1, (n, L)), rng.uniform(0.25, 1, (n, L))
    runs = [_fake_run("prada-confusion", s, [0.5, 0.5], 0.5, (before[s].tolist(), after[s].tolist()))
            for s in range(n)]
    rows = summarise(runs, variants(8)["prada-confusion"])["layer_probes"]
    assert [r["layer"] for r in rows] == list(range(L))
    for i, r in enumerate(rows):
        assert r["before"]["mean"] == pytest.approx(before[:, i].mean())
        assert r["after"]["mean"] == pytest.approx(after[:, i].mean())
        assert r["drop"]["mean"] == pytest.approx((before[:, i] - after[:, i]).mean())
        assert r["after"]["std"] == pytest.approx(after[:, i].std(ddof=1))
    assert summarise([_fake_run("cot", 0, [0.5, 0.5], 0.5)], variants(8)["cot"])["layer_probes"] is None


def test_domain_share_per_layer_over_seeds_and_paired_against_a(seed):
    """Every layer's domain share: the mean over seeds, and each arm's per-seed difference
    against (A) with its t-interval (numpy here), paired by seed, over the layers all runs have."""
    from prada_fast.experiments.compare.statistics import paired_differences, summarise
    rng = np.random.default_rng(seed)
    n, L = 5, 7
    share = {"cot": rng.uniform(0.3, 0.8, (n, L)), "prada-confusion": rng.uniform(0.3, 0.8, (n, L))}
    by = {}
    for k, a in share.items():
        by[k] = [_fake_run(k, s, [0.5, 0.5], 0.5) for s in range(n)]
        for s, r in enumerate(by[k]):
            r["layer_domain_share"] = a[s].tolist()
    by["prada-confusion"][2]["layer_domain_share"].append(0.5)  # a longer run: the common layers count
    by["cot"] = by["cot"][::-1]
    mine = summarise(by["prada-confusion"], variants(8)["prada-confusion"])["layer_domain_share"]
    assert len(mine) == L
    assert [x["mean"] for x in mine] == pytest.approx(share["prada-confusion"].mean(0).tolist())
    got = paired_differences(by, "cot")["prada-confusion"]["layer_domain_share"]
    diff = share["prada-confusion"] - share["cot"]
    half = 2.776 * diff.std(0, ddof=1) / math.sqrt(n)  # t(0.975, 4)
    for i in range(L):
        assert got[i]["mean"] == pytest.approx(diff[:, i].mean())
        assert got[i]["ci95"] == pytest.approx([diff[:, i].mean() - half[i], diff[:, i].mean() + half[i]],
                                               rel=1e-3)
    assert summarise([_fake_run("cot", 0, [0.5, 0.5], 0.5)],
                     variants(8)["cot"])["layer_domain_share"] is None  # no run has them


def test_bad_flags_are_refused(tmp_path, capsys):
    for bad in (["--extra", "--seed 3"], ["--extra", "--lm-weight 2"], ["--extra", "--data-seed 1"],
                ["--seeds", "0,0"], ["--variants", "cot,foo"], ["--lm-weight", "-1"],
                ["--tune-lm-weights", "0.3,nan"], ["--teacher-seed", "-1"],
                ["--data", "../shared/data/aqua_dev.json"], ["--eval-per-domain", "1"]):
        with pytest.raises(SystemExit) as e:
            parse_args(["--output-dir", str(tmp_path), *bad])
        assert e.value.code == 2, bad


# ----------------------------------------------------------------------------- end to end

TINY = ["--seeds", "0,1", "--variants", "cot,cot-lm,prada-confusion-lm", "--prompt-encoder", "mlp",
        "--jobs", "2", "--max-steps", "3", "--teacher-steps", "3", "--data", "synthetic:24",
        "--eval-per-domain", "2", "--log-every", "1", "--extra", "--max-new-tokens 8 --max-len 96"]


def compare(out: Path, *extra):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "prada_fast.experiments.compare", *TINY, "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_three_variants_two_seeds_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    compare(out)
    report = json.loads((out / "report.json").read_text())
    assert report["n_runs_done"] == report["n_runs_planned"] == 6
    assert report["command"].startswith("python -m prada_fast.experiments.compare")
    res = report["results"]["sorting"]
    assert res["n_domains"] == 4 and res["chance"] == 0.25
    assert set(res["variants"]) == {"cot", "cot-lm", "prada-confusion-lm"}
    for k, v in res["variants"].items():
        assert v["seeds"] == [0, 1]
        assert set(v["domains"]) == {"arithmetic", "coinflip", "lastletter", "sorting"}
        assert v["domains"]["sorting"]["role"] == "target"
        for key in ("target_accuracy_after", "source_accuracy_after", "probe_accuracy",
                    "ncm_accuracy", "domain_share", "domain_classifier_accuracy", "final_loss", "final_ce"):
            a = v[key]
            assert a["n"] == 2 and a["mean"] is not None and a["std"] is not None, (k, key)
            assert a["mean"] == pytest.approx(sum(a["values"]) / 2)
        acc = v["domains"]["arithmetic"]["accuracy_after"]
        assert acc["n"] == 2 and 0 <= acc["mean"] <= 1
    assert res["variants"]["cot"]["domain_head_trained"] is False
    assert res["variants"]["prada-confusion-lm"]["final_dom"]["mean"] > 0
    assert res["variants"]["cot"]["final_dom"]["mean"] == 0  # no domain loss in (A)
    assert res["variants"]["cot-lm"]["final_lm"]["mean"] > 0  # the LM term is on in (B) and (D)
    assert res["variants"]["prada-confusion-lm"]["final_lm"]["mean"] > 0
    assert res["variants"]["cot"]["final_lm"]["n"] == 0  # and off in (A)
    assert set(res["paired_vs_cot"]) == {"cot-lm", "prada-confusion-lm"}
    assert set(res["paired_vs_cot_lm"]) == {"cot", "prada-confusion-lm"}
    ci = res["paired_vs_cot_lm"]["prada-confusion-lm"]["target_accuracy_after"]["ci95"]
    assert ci is not None and ci[0] <= ci[1]
    assert res["verdict"]["arms"]["prada-confusion-lm"]["target_ci95"] == ci
    # one teacher for both seeds: one fit in the shared cache, by the first run, which ends
    # before the others start; then two runs at a time (--jobs 2)
    assert len([p for p in (out / "teachers").iterdir() if p.is_dir()]) == 1
    spans = {(r["variant"], r["seed"]): json.loads((out / r["dir"] / "compare_run.json").read_text())
             for r in report["runs"]}
    first = spans.pop(("cot", 0))
    assert all(x["started_at"] >= first["ended_at"] for x in spans.values())
    ordered = sorted(spans.values(), key=lambda x: x["started_at"])
    assert any(b["started_at"] < a["ended_at"] for a, b in zip(ordered, ordered[1:]))  # overlapping
    assert max(sum(x["started_at"] <= y["started_at"] < x["ended_at"] for x in ordered)
               for y in ordered) == 2  # never three at once
    for k, v in res["variants"].items():  # the tiny student: the embeddings and 3 layers
        rows = v["layer_probes"]
        assert [r["layer"] for r in rows] == [0, 1, 2, 3], k
        assert all(r["before"]["n"] == r["after"]["n"] == 2 for r in rows)
    for r in report["runs"]:  # the last layer's probe is the trainer's probe on the final features
        summary = json.loads((out / r["dir"] / "summary.json").read_text())["domain_alignment"]
        assert summary["layer_probe_accuracy"][-1] == summary["probe_accuracy"]
        feats = torch.load(out / r["dir"] / "pooled_features.pt")  # the domain share of the same features
        assert r["domain_share"] == pytest.approx(domain_variance_share(feats["features"], feats["labels"]))
        assert 0 < r["domain_share"] < 1
    dd = res["paired_vs_cot"]["prada-confusion-lm"]["domain_share"]
    runs_of = {(r["variant"], r["seed"]): r for r in report["runs"]}
    assert dd["values"] == pytest.approx([runs_of[("prada-confusion-lm", s)]["domain_share"]
                                          - runs_of[("cot", s)]["domain_share"] for s in (0, 1)])
    # every layer's domain share (the final one is the head's input: no --pool-layer here),
    # its mean over seeds and its paired difference against (A), layer by layer
    for r in report["runs"]:
        shares = r["layer_domain_share"]
        assert len(shares) == 4 and shares[-1] == pytest.approx(r["domain_share"])
        assert all(0 < x < 1 for x in shares)
    per_layer = res["paired_vs_cot"]["prada-confusion-lm"]["layer_domain_share"]
    for i in range(4):
        d_ref = [runs_of[("prada-confusion-lm", s)]["layer_domain_share"][i]
                 - runs_of[("cot", s)]["layer_domain_share"][i] for s in (0, 1)]
        assert per_layer[i]["values"] == pytest.approx(d_ref) and per_layer[i]["ci95"] is not None
        assert res["variants"]["cot"]["layer_domain_share"][i]["mean"] == pytest.approx(
            sum(runs_of[("cot", s)]["layer_domain_share"][i] for s in (0, 1)) / 2)
    inside = res["variants"]["prada-confusion-lm"]["head_subspace_in_head_rows"]
    assert inside["n"] == 2 and 0 <= inside["mean"] <= 1

    plots = report["plots"]["sorting"]
    for name in (plots["pca"], plots["loss_curves"]):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert set(plots["pca_explained_variance"]) == {"cot", "prada-confusion-lm"}
    md = (out / "report.md").read_text()
    for text in ("(A) plain CoT distillation", "(B) CoT + LM term", "(D) PRADA", " ± ", "Δ domain share",
                 "PRADA helps only where (C) or (D) beats (B)", "Fresh probe per layer",
                 "Domain share per layer", "in the head's rows / outside",
                 plots["pca"], plots["loss_curves"], report["command"]):
        assert text in md
    # every run left its own directory, metrics and pooled features
    for v in ("cot", "cot-lm", "prada-confusion-lm"):
        for s in (0, 1):
            d = out / "runs" / "sorting" / v / f"seed{s}"
            assert (d / "summary.json").is_file() and (d / "pooled_features.pt").is_file()

    # resumable: the same command again reuses every finished run and trains nothing
    last = out / "runs" / "sorting" / "prada-confusion-lm" / "seed1" / "summary.json"
    stamp = last.stat().st_mtime
    proc = compare(out)
    again = json.loads((out / "report.json").read_text())
    assert again["n_runs_trained"] == 0 and again["n_runs_done"] == 6
    assert {r["status"] for r in again["runs"]} == {"reused"}
    assert last.stat().st_mtime == stamp
    assert "reused" in proc.stdout
    assert again["results"]["sorting"]["variants"]["prada-confusion-lm"]["target_accuracy_after"] == \
        res["variants"]["prada-confusion-lm"]["target_accuracy_after"]

    # an interrupted run resumes from its latest checkpoint and ends as if never interrupted:
    # the (D) run of seed 1 (soft prompt, adversary, LM term) is redone, stopped after step 2
    # of 3 with the flags compare gave it, and the same command finishes it
    d = out / "runs" / "sorting" / "prada-confusion-lm" / "seed1"
    argv = json.loads((d / "compare_run.json").read_text())["trainer_args"]
    assert argv[argv.index("--save-every") + 1] == "100"
    first_metrics = _losses(d / "metrics.jsonl")
    first_summary = json.loads((d / "summary.json").read_text())
    # the environment compare gives its runs: a job of its own (no launcher variable of this
    # process, e.g. an in-process run's MASTER_PORT whose port it may still hold, reaches it)
    env = trainer_env(parse_args([*TINY, "--output-dir", str(out)]))
    stop = subprocess.run([sys.executable, "prada_fast/train.py", *argv, "--overwrite", "--stop-after", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert stop.returncode == 0, stop.stderr[-4000:]
    (d.parent / "seed1.started.json").write_text(json.dumps({"trainer_args": argv}))
    assert not (d / "summary.json").exists() and (d / "checkpoints" / "latest").read_text() == "step2"
    proc = compare(out)
    assert "seed=1: resuming the unfinished run from its checkpoint step2" in proc.stdout
    third = json.loads((out / "report.json").read_text())
    assert third["n_runs_trained"] == 1 and third["n_runs_done"] == 6
    assert "resumed from" in (d.parent / "seed1.log").read_text()
    assert _losses(d / "metrics.jsonl") == first_metrics  # steps 1-2 kept, step 3 recomputed
    again_summary = json.loads((d / "summary.json").read_text())
    for key in ("final_loss", "domains", "domain_classifier_accuracy", "domain_alignment"):
        assert again_summary[key] == first_summary[key], key
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step3"]
    assert json.loads((d / "compare_run.json").read_text())["resumed_from"] == "step2"
    assert not (d.parent / "seed1.started.json").exists()

    # --drop-weights: the weights go, each run's record stays, and the experiment continues
    # elsewhere: copied with fresh file times (as git or a copy leaves them), every run is
    # reused and reported as before, without its weights
    proc = compare(out, "--drop-weights")
    dropped = json.loads((out / "report.json").read_text())
    assert dropped["n_runs_trained"] == 0
    assert not list(out.glob("runs/*/*/seed*/final")) and not list(out.glob("runs/*/*/seed*/checkpoints"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock"))
    for f in moved.rglob("summary.json"):
        os.utime(f)  # newer than the record: a record is matched by content, not by time
    compare(moved)
    there = json.loads((moved / "report.json").read_text())
    assert there["n_runs_trained"] == 0 and there["n_runs_done"] == 6
    assert there["results"] == dropped["results"]
    for k, v in third["results"]["sorting"]["variants"].items():  # (third: a wall time unrounded)
        assert {m: x for m, x in v.items() if m != "wall_seconds"} == {
            m: x for m, x in dropped["results"]["sorting"]["variants"][k].items() if m != "wall_seconds"}
    res_d, res_3 = dropped["results"]["sorting"], third["results"]["sorting"]
    assert res_d["paired_vs_cot_lm"] == res_3["paired_vs_cot_lm"]
    # a summary that is not the record's: that run is no longer finished
    s1 = moved / "runs" / "sorting" / "cot" / "seed1" / "summary.json"
    s1.write_text(s1.read_text() + " ")
    compare(moved, "--report-only")
    assert json.loads((moved / "report.json").read_text())["n_runs_done"] == 5


def _losses(path: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_two_runs_at_once_on_a_cpu_machine_one_thread_each(monkeypatch, tmp_path):
    """--jobs defaults to 2 without CUDA on 2+ cores; while runs share the machine each gets
    cores / jobs threads, a run that trains alone (tuning, the teacher's fit) every core."""
    import prada_fast.experiments.compare.flags as flags
    import prada_fast.experiments.compare.runs as runs
    out = ["--output-dir", str(tmp_path / "cmp")]
    for cores, cuda, extra, jobs, threads, alone in (
            (2, False, [], 2, 1, None), (16, False, [], 2, 8, None), (1, False, [], 1, None, None),
            (8, True, [], 1, None, None), (2, False, ["--nproc", "2"], 1, None, None),
            (2, False, ["--jobs", "1"], 1, None, None), (4, False, ["--jobs", "3"], 3, 1, None),
            (4, False, ["--jobs", "3", "--threads", "2"], 3, 2, 2)):
        monkeypatch.setattr(flags, "usable_cores", lambda cores=cores: cores)
        monkeypatch.setattr(runs, "usable_cores", lambda cores=cores: cores)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        args = parse_args(out + extra)
        got = (args.jobs, runs.run_threads(args), runs.run_threads(args, alone=True))
        assert got == (jobs, threads, alone), (cores, cuda, extra)
        env = runs.trainer_env(args)
        assert env.get("OMP_NUM_THREADS") == (str(threads) if threads else None)
    with pytest.raises(SystemExit):
        parse_args(out + ["--jobs", "0"])


def test_each_training_run_is_a_job_of_its_own(monkeypatch, tmp_path):
    """A launcher's variables in compare's environment (an in-process run before it: RANK,
    MASTER_PORT of a process group that may still hold the port) never reach the trainer
    runs it starts: each picks its own port (CI saw EADDRINUSE from an inherited one)."""
    from prada_fast.experiments.compare.runs import trainer_env
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(k, v)
    env = trainer_env(parse_args(["--output-dir", str(tmp_path / "cmp"), "--threads", "1"]))
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & env.keys()
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == os.environ["PATH"]


def test_blind_keeps_the_target_out_of_sight_until_every_run_is_finished(tmp_path, monkeypatch, capsys):
    """--blind: a finished run's line names its source accuracy, never its target's, and no
    report is written while a run of the plan is missing; once none is, the report is."""
    from prada_fast.experiments.compare import command as cmp
    have = {("cot", 0), ("cot", 1), ("cot-lm", 0)}  # (cot-lm, 1) not trained yet
    monkeypatch.setattr(cmp, "ensure_run", lambda args, argv, d, tag, walls, alone=False:
                        ("reused" if (d.parent.name, int(d.name[4:])) in have else "missing", None))

    def collect(args, t, v, s, status, wall):
        return {**_fake_run(v.key, s, [0.5, 0.625], 0.8125), "target": t}
    monkeypatch.setattr(cmp, "collect_run", collect)
    reports = []
    monkeypatch.setattr(cmp, "build_report", lambda args, argv, runs, n, t0: reports.append(runs)
                        or {"plots": {}, "wall_seconds": 1.0})
    monkeypatch.setattr(cmp, "write_markdown", lambda report, path: path.write_text("report"))
    argv = ["--output-dir", str(tmp_path), "--variants", "cot,cot-lm", "--seeds", "0,1",
            "--teacher", "none", "--report-only"]
    assert cmp.main(argv + ["--blind"]) == 0
    out = capsys.readouterr().out
    assert out.count("acc source 0.562 target hidden until every run is finished") == 3
    assert "0.812" not in out and "3 of 4 runs are finished: no report" in out
    assert not reports and not (tmp_path / "report.md").exists()
    assert cmp.main(argv) == 0  # without --blind: the partial report, the target named
    assert "target 0.812" in capsys.readouterr().out and len(reports[-1]) == 3
    (tmp_path / "report.md").unlink()
    have.add(("cot-lm", 1))
    assert cmp.main(argv + ["--blind"]) == 0
    assert "0.812" not in capsys.readouterr().out  # the lines stay blind; the report is there
    assert len(reports[-1]) == 4 and (tmp_path / "report.md").read_text() == "report"


def test_the_tuning_table_marks_the_adversary_knobs_prada_took():
    """The adversary alone is tuned for PRADA's sake even when it is not an arm: its row with
    the lambda and lr multiplier PRADA took is marked chosen, the others are not."""
    from prada_fast.experiments.compare.report import chosen_row
    base = {"lm_weight": 1.0, "domain_steps": 0, "head_lr_mult": 10.0, "prompt_encoder": "none"}
    chosen = {"cot": base, "cot-lm": base, "prada-confusion": {**base, "lambda_max": 1.0},
              "prada-confusion-lm": {**base, "lambda_max": 1.0}}
    rows = [{"variant": "cot", "knobs": None},
            {"variant": "confusion", "knobs": {**base, "lambda_max": 0.3}},
            {"variant": "confusion", "knobs": {**base, "lambda_max": 1.0}},
            {"variant": "grl", "knobs": {**base, "lambda_max": 1.0}},
            {"variant": "confusion", "knobs": {**base, "lambda_max": 1.0, "domain_steps": 2}},
            {"variant": "prada-confusion", "knobs": {**base, "lambda_max": 1.0}}]
    assert [chosen_row(r, chosen) for r in rows] == [False, False, True, False, False, True]
