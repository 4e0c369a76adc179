import json
import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run under the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from runner import REPO


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
