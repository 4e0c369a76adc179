"""DIR/final: the trained student as a Hugging Face model directory, plus the soft prompt
and the domain head, gathered from ZeRO-3 partitions one parameter at a time. A prompt
encoder (P-tuning) is not saved: its output is, as the soft prompt's plain vectors."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from prada_fast.models.prada import PradaModel


def gather_state(module, rank0: bool) -> dict:
    """Full tensors of `module`'s parameters, gathered one at a time (ZeRO-3), on rank 0."""
    from deepspeed import zero
    out = {}
    for name, p in module.named_parameters():
        with zero.GatheredParameters([p], modifier_rank=None):
            if rank0:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def baked_prompt(model: PradaModel, rank0: bool):
    """The soft prompt as plain (K, H) vectors on rank 0: a P-tuning encoder's output
    computed once from the gathered free vectors and encoder weights (None without one)."""
    from deepspeed import zero
    if model.soft_prompt is None:
        return None
    encoder = model.prompt_encoder
    params = [model.soft_prompt, *(encoder.parameters() if encoder is not None else ())]
    with zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        return model.prompt_vectors().detach().to("cpu", copy=True) if rank0 else None


def export_final(model: PradaModel, tok, out_dir: Path, run_meta: dict, rank0: bool = True) -> None:
    """DIR/final: the student as a Hugging Face model directory plus soft prompt and head,
    and prada_config.json: the model's PradaConfig fields plus `run_meta` (the run's
    "domains" and their "roles"). Every rank takes part in the gathers (ZeRO-3); rank 0
    (`rank0`) writes."""
    meta = {**run_meta, **model.prada_config.to_meta()}
    student_sd = gather_state(model.student, rank0)
    heads_sd = gather_state(model.domain_head, rank0)
    prompt = baked_prompt(model, rank0)
    if rank0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.student.save_pretrained(tmp, state_dict=student_sd)
        tok.save_pretrained(tmp)
        model.save_heads(tmp, {"soft_prompt": prompt, "domain_head": heads_sd}, meta)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
