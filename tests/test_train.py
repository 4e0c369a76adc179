"""End-to-end runs of prada_fast/train.py on the CPU: two-rank ZeRO-3 with real sharding,
chunked vs reference loss under ZeRO-3 (tied embeddings), exact resume, and the errors a
user gets for bad input. Each case is a real subprocess, as a user would run it."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAST = ["--data", "synthetic:48", "--eval-per-domain", "4", "--max-new-tokens", "24",
        "--no-progress", "--log-every", "1", "--max-len", "128"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="session")
def ds_config(tmp_path_factory):
    """zero3.json with every parameter partitioned (persistence threshold 0), batch 8."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["train_batch_size"] = 8
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_test.json"
    path.write_text(json.dumps(cfg))
    return path


def train(args, cache, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRADA_FAST_CACHE": str(cache),
           "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "prada_fast/train.py", *args]
    else:
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(_port()),
               "prada_fast/train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tied_student(tmp_path_factory):
    """A tiny Llama with tied input/output embeddings, saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prada_fast.model import byte_tokenizer
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "tied-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory, cache, ds_config, tied_student):
    """The same 2-rank ZeRO-3 run with the chunked and the reference loss."""
    runs = {}
    for impl in ("chunked", "reference"):
        out = tmp_path_factory.mktemp(f"run-{impl}")
        train([*FAST, "--ds", str(ds_config), "--output-dir", str(out), "--overwrite",
               "--student", str(tied_student), "--teacher", "tiny-teacher", "--max-steps", "6", "--lr", "0.01",
               "--loss-impl", impl, "--seed", "3"], cache, nproc=2)
        runs[impl] = out
    return runs


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


def test_final_model_loads_with_from_pretrained(two_rank_runs, tied_student):
    from transformers import AutoModelForCausalLM

    from prada_fast.model import PradaModel
    final = two_rank_runs["chunked"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(tied_student)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # it was trained
    prada, tok, meta = PradaModel.from_final(final)
    assert prada.soft_prompt.shape == (8, 64) and meta["domains"][3] == "sorting"


def test_chunked_and_reference_agree_under_zero3(two_rank_runs):
    from safetensors.torch import load_file
    a, b = (metrics(two_rank_runs[k]) for k in ("chunked", "reference"))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd", "dom"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(rb[key]) + 1e-7, (ra["step"], key)
    wa, wb = (load_file(two_rank_runs[k] / "final" / "model.safetensors") for k in ("chunked", "reference"))
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).norm() / wb[k].double().norm()
        assert diff <= 1e-5, (k, float(diff))


def test_resume_continues_with_identical_losses(tmp_path, cache):
    common = [*FAST, "--max-steps", "8", "--save-every", "4", "--teacher-steps", "10", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    train([*common, "--output-dir", str(full), "--eval-per-domain", "0"], cache)
    train([*common, "--output-dir", str(part), "--eval-per-domain", "0", "--stop-after", "4"], cache)
    assert not (part / "final").exists() and (part / "checkpoints" / "step4").is_dir()
    train([*common, "--output-dir", str(part), "--eval-per-domain", "0", "--resume"], cache)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd", "dom", "dom_acc", "grl_lambda", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    assert (part / "final" / "model.safetensors").is_file()


def test_bad_input_exits_2_with_a_message(tmp_path, cache):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    proc = train([*FAST, "--output-dir", str(busy)], cache, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,\n "zero_optimization": {"stage": 3,}}')
    proc = train([*FAST, "--output-dir", str(tmp_path / "o1"), "--ds", str(bad)], cache, check=False)
    assert proc.returncode == 2 and "bad.json:2" in proc.stderr
    proc = train([*FAST, "--output-dir", str(tmp_path / "o2"), "--student", str(tmp_path / "nope")],
                 cache, check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_help_lists_every_flag():
    proc = subprocess.run([sys.executable, "prada_fast/train.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--ds", "--output-dir", "--max-steps", "--save-every", "--seed", "--resume",
                 "--overwrite", "--data", "--source-domains", "--target-domains", "--loss-impl",
                 "--teacher", "--student", "--attn", "--local_rank"):
        assert flag in proc.stdout
