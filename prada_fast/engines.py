"""The DeepSpeed engines of a PRADA run and one micro-batch step on them.

Shared by the trainer (trainloop.py) and the training-step benchmarks
(benchmarks/train_step.py, benchmarks/max_batch.py, benchmarks/profiler.py), so that what
the benchmarks time is the trainer's own step:

    engine, t_engine = build_engines(model, teacher, ds_cfg)
    loss, parts = micro_step(engine, t_engine, mb, norm=..., lam=..., temperature=..., alpha=...)
"""
from __future__ import annotations

import torch
from deepspeed import zero

from .dsconfig import inference_config


def build_engines(model, teacher, ds_cfg: dict):
    """(engine, teacher_engine or None): the student (a PradaModel) trains its parameters
    that require grad under `ds_cfg`; the teacher, frozen here (no grad, eval mode), is
    sharded the same way with no optimizer (`dsconfig.inference_config`)."""
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg)
    t_engine = None
    if teacher is not None:
        teacher.requires_grad_(False)
        teacher.eval()
        t_engine, *_ = deepspeed.initialize(model=teacher, config=inference_config(ds_cfg))
        t_engine.eval()
    return engine, t_engine


def teacher_hidden(t_engine, mb: dict, device):
    """(final hidden states, output-head weight) of the teacher on micro-batch `mb`, or
    (None, None) without a teacher. The weight is a ZeRO-3 partition: gather it around its
    use (`micro_step` does)."""
    if t_engine is None:
        return None, None
    teacher = t_engine.module
    with torch.no_grad():
        backbone = getattr(teacher, teacher.base_model_prefix)
        th = backbone(input_ids=mb["input_ids"].to(device),
                      attention_mask=mb["attention_mask"].to(device), use_cache=False)
    return th.last_hidden_state, teacher.get_output_embeddings().weight


def micro_step(engine, t_engine, mb: dict, *, norm: float, lam: float, temperature: float,
               alpha: float, use_domain: bool = True, inject_nan: bool = False):
    """One micro-batch: teacher pass, student forward (the loss op, with the teacher head
    gathered), `engine.backward` and `engine.step` (DeepSpeed applies the optimizer at the
    last micro-batch of the accumulation). Returns (loss, parts).

    norm: the loss normaliser (valid target tokens per rank and micro-batch; DeepSpeed
    averages over both); lam: the GRL coefficient. inject_nan: multiply the loss by NaN
    before the backward pass (fault injection, the trainer's --inject-nan)."""
    device = engine.device
    th, tw = teacher_hidden(t_engine, mb, device)
    with zero.GatheredParameters([tw] if tw is not None else [], modifier_rank=None):
        loss, parts = engine(
            mb["input_ids"].to(device), mb["attention_mask"].to(device),
            mb["labels"].to(device), mb["domain_labels"].to(device),
            teacher_hidden=th, teacher_weight=tw, grl_lambda=lam,
            num_valid_tokens=max(norm, 1e-9), temperature=temperature, alpha=alpha,
            use_domain=use_domain)
    if inject_nan:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()
    return loss, parts
