"""End-to-end runs of prada_fast/train.py on the CPU: two-rank ZeRO-3 with real sharding,
chunked vs reference loss under ZeRO-3 (tied embeddings), exact resume, --help. Each case
is a real subprocess, as a user would run it."""
import json
import subprocess
import sys

import pytest
import torch
from runner import FAST, FIT, REPO, assert_same_losses, metrics, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory, cache, ds_config, tied_student):
    """The same 2-rank ZeRO-3 run with the chunked and the reference loss (the soft prompt
    through a P-tuning encoder, sharded too). The head at the student's lr: at this test's
    lr 0.01 the default 10x makes the head's steps too large for CE to fall in 6 steps."""
    runs = {}
    for impl in ("chunked", "reference"):
        runs[impl] = _two_rank_run(tmp_path_factory, cache, ds_config, tied_student, impl)
    return runs


def _two_rank_run(tmp_path_factory, cache, ds_config, tied_student, impl, *extra):
    out = tmp_path_factory.mktemp(f"run-{impl}")
    train([*FAST, "--ds", str(ds_config), "--output-dir", str(out), "--overwrite",
           "--student", str(tied_student), "--teacher", "tiny-teacher", "--max-steps", "6",
           "--lr", "0.01", "--loss-impl", impl, "--seed", "3", "--prompt-encoder", "mlp",
           "--domain-head-lr-mult", "1", *extra],
          cache, nproc=2)
    return out


def test_two_rank_zero3_partitions_parameters_and_learns(two_rank_runs):
    out = two_rank_runs["chunked"]
    summary = json.loads((out / "summary.json").read_text())
    z = summary["zero3"]
    assert summary["world_size"] == 2 and len(z["local_numel"]) == 2
    assert z["partitioned_tensors"] == z["tensors"]  # threshold 0: every tensor is split
    for local in z["local_numel"]:
        assert local <= 0.55 * z["full_numel"]  # each rank holds about half
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3
    assert all(r["kd"] > 0 for r in rows)  # the teacher term is live
    for key in ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr", "tokens_per_s"):
        assert key in rows[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"
    assert set(summary["domains"]) == {"arithmetic", "coinflip", "lastletter", "sorting"}
    assert summary["domains"]["sorting"]["role"] == "target"


def test_generations_are_the_held_out_questions_and_give_the_summary(two_rank_runs):
    """DIR/generations_{before,after}.jsonl: one row per held-out question (4 a domain, as
    --eval-per-domain asks), none of them a training question, with the gold answer of the
    data, and the summary's accuracies are their fractions graded correct."""
    from prada_fast.data.prepare import DataSettings, load_run_data
    out = two_rank_runs["chunked"]
    summary = json.loads((out / "summary.json").read_text())
    data = load_run_data(DataSettings(specs=("synthetic:48",), eval_per_domain=4, seed=3))
    gold = {(r.domain, r.question): r.answer for r in data.eval_records}
    trained = {(r.domain, r.question) for r in data.train_records}
    for when in ("before", "after"):
        rows = [json.loads(x) for x in (out / f"generations_{when}.jsonl").read_text().splitlines()]
        assert sorted((r["domain"], r["question"]) for r in rows) == sorted(gold)
        assert len(rows) == 16 and not {(r["domain"], r["question"]) for r in rows} & trained
        for d, s in summary["domains"].items():
            mine = [r for r in rows if r["domain"] == d]
            assert all(r["gold"] == gold[(d, r["question"])] and isinstance(r["generated"], str)
                       for r in mine)
            assert s[f"accuracy_{when}"] == pytest.approx(sum(r["correct"] for r in mine) / 4)


def test_final_model_loads_with_from_pretrained(two_rank_runs, tied_student):
    from transformers import AutoModelForCausalLM

    from prada_fast.models import PradaModel
    final = two_rank_runs["chunked"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(tied_student)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # it was trained
    prada, tok, meta = PradaModel.from_final(final)
    assert prada.soft_prompt.shape == (8, 64) and meta["domains"][3] == "sorting"
    assert meta["prompt_encoder"] == "mlp" and prada.prompt_encoder is None  # baked


def test_chunked_and_reference_agree_under_zero3(two_rank_runs):
    from safetensors.torch import load_file
    a, b = (metrics(two_rank_runs[k]) for k in ("chunked", "reference"))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd", "dom"):
            # metrics.jsonl rounds to 6 decimals: up to 1e-6 apart from rounding alone
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(rb[key]) + 1.5e-6, (ra["step"], key)
    wa, wb = (load_file(two_rank_runs[k] / "final" / "model.safetensors") for k in ("chunked", "reference"))
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).norm() / wb[k].double().norm()
        assert diff <= 1e-5, (k, float(diff))


def test_packed_two_rank_run_equals_the_padded_one(two_rank_runs, tmp_path_factory, cache, ds_config,
                                                   tied_student):
    """Packed rows (the default) under 2-rank ZeRO-3, live teacher and domain head: the same
    losses step by step and the same trained weights as the padded run, with less padding."""
    from safetensors.torch import load_file
    packed = two_rank_runs["chunked"]
    padded = _two_rank_run(tmp_path_factory, cache, ds_config, tied_student, "chunked", "--no-packing")
    a, b = metrics(packed), metrics(padded)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd", "dom", "dom_acc"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(rb[key]) + 1.5e-6, (ra["step"], key)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (packed, padded))
    assert sa["real_tokens"] == sb["real_tokens"] > 0
    assert sa["padding_fraction"] < sb["padding_fraction"]
    wa, wb = (load_file(d / "final" / "model.safetensors") for d in (packed, padded))
    for k in wb:
        diff = (wa[k].double() - wb[k].double()).norm() / wb[k].double().norm()
        assert diff <= 1e-5, (k, float(diff))


@pytest.mark.parametrize("batching", [[], ["--tokens-per-batch", "900"]], ids=["examples", "by-tokens"])
def test_resume_continues_with_identical_losses(tmp_path, cache, batching):
    # the confusion adversary and a domain head in an optimizer group of its own (10x lr): its
    # state is checkpointed and resumed exactly too; packed micro-batches cut by tokens too
    common = [*FAST, "--max-steps", "8", "--save-every", "4", *FIT,
              "--adversary", "confusion", "--domain-head-lr-mult", "10", *batching]
    full, part = tmp_path / "full", tmp_path / "part"
    train([*common, "--output-dir", str(full)], cache)
    train([*common, "--output-dir", str(part), "--stop-after", "4"], cache)
    assert not (part / "final").exists() and (part / "checkpoints" / "step4").is_dir()
    train([*common, "--output-dir", str(part), "--resume"], cache)
    assert_same_losses(metrics(full), metrics(part), 8,
                       ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr"))
    assert (part / "final" / "model.safetensors").is_file()


def test_help_lists_every_flag():
    proc = subprocess.run([sys.executable, "prada_fast/train.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--ds", "--output-dir", "--max-steps", "--save-every", "--seed", "--resume",
                 "--overwrite", "--data", "--source-domains", "--target-domains", "--loss-impl",
                 "--teacher", "--student", "--attn", "--local_rank"):
        assert flag in proc.stdout
