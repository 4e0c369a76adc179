import json
import os
import random
import zlib

import torch

if not torch.cuda.is_available():  # the Triton kernels run under the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from runner import REPO


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="the random seed of every test (default: one per test, from its id); "
                          "a failing test prints its seed and the command that replays it")
    parser.addoption("--gpu-rehearsal", action="store_true",
                     help="also run every stage of benchmarks/tools/gpu_session.py at tiny shapes on this "
                          "machine, the first command's (about 8 minutes on 2 cores) and the second's "
                          "(peers, through benchmarks/gpu_session.sh): do it before a GPU session")


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's random seed: a hash of its id (fresh inputs across tests and parameters,
    the same on every run), or --seed. Seeds torch's, numpy's and Python's global RNGs too;
    tests draw their inputs from it, and a failure prints it."""
    forced = request.config.getoption("--seed")
    value = forced if forced is not None else zlib.crc32(request.node.nodeid.encode()) % 2**31
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    random.seed(value)
    try:
        import numpy as np
        np.random.seed(value)
    except ImportError:
        pass
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed_value = dict(item.user_properties).get("seed")
    if report.failed and seed_value is not None:
        report.sections.append(("random seed", f"seed {seed_value}; replay: python -m pytest "
                                f"'{item.nodeid}' --seed {seed_value}"))
    return report


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """prada_fast.train.main called in this process, a world of one; a teacher it fits is
    cached under this test's tmp_path."""
    from prada_fast.common.distributed import free_port

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()),
                 "PRADA_FAST_CACHE": str(tmp_path / "teacher-cache")}.items():
        monkeypatch.setenv(k, v)
    from prada_fast.train import main
    return main


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A teacher cache shared by the end-to-end runs of one session."""
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


@pytest.fixture(scope="session")
def tied_student(tmp_path_factory):
    """A tiny Llama with tied input/output embeddings, saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prada_fast.models import byte_tokenizer
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "tied-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
