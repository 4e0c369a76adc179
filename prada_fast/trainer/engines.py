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

from prada_fast.trainer.dsconfig import ConfigError, inference_config
from prada_fast.models.packed_attention import backbone_forward
from prada_fast.teacher.cache import TeacherOutputs


# Schedulers that scale each parameter group's own lr (a multiplier survives them); the
# others set one lr for every group.
GROUP_AWARE_SCHEDULERS = ("WarmupCosineLR",)


def param_groups(model, head_lr_mult: float, ds_cfg: dict):
    """The optimizer's parameter groups: the student and its prompt, then the domain head at
    head_lr_mult x the lr (a group of its own, so the optimizer state and the checkpoint
    keep it apart). One group when the multiplier is 1."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr_mult == 1.0:
        return [p for _, p in trainable]
    sched = (ds_cfg.get("scheduler") or {}).get("type")
    if sched and sched not in GROUP_AWARE_SCHEDULERS:
        raise ConfigError(f"--domain-head-lr-mult needs a scheduler that keeps each group's lr "
                          f"({', '.join(GROUP_AWARE_SCHEDULERS)}); the config's {sched} sets one lr "
                          "for every group (use WarmupCosineLR, or --domain-head-lr-mult 1)")
    lr = (ds_cfg.get("optimizer") or {}).get("params", {}).get("lr")
    if lr is None:
        raise ConfigError("--domain-head-lr-mult needs the optimizer's lr in the DeepSpeed config")
    head = [p for n, p in trainable if n.startswith("domain_head.")]
    rest = [p for n, p in trainable if not n.startswith("domain_head.")]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


def build_engines(model, teacher, ds_cfg: dict, head_lr_mult: float = 1.0):
    """(engine, teacher_engine or None): the student (a PradaModel) trains its parameters
    that require grad under `ds_cfg` (the domain head at head_lr_mult x the lr); the
    teacher, frozen here (no grad, eval mode), is sharded the same way with no optimizer
    (`dsconfig.inference_config`)."""
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, head_lr_mult, ds_cfg), config=ds_cfg)
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
        if "teacher_position_ids" in mb:  # packed rows: the same rows, sequences kept apart
            th = backbone_forward(backbone, mb["teacher_position_ids"].to(device),
                                  input_ids=mb["input_ids"].to(device))
        else:
            th = backbone(input_ids=mb["input_ids"].to(device),
                          attention_mask=mb["attention_mask"].to(device),
                          use_cache=False).last_hidden_state
    return th, teacher.get_output_embeddings().weight


def micro_step(engine, t_engine, mb: dict, *, norm: float, lam: float, temperature: float,
               alpha: float, use_domain: bool = True, inject_nan: bool = False):
    """One micro-batch: teacher pass (or its cached outputs), student forward (the loss op,
    with the teacher head gathered), `engine.backward` and `engine.step` (DeepSpeed applies
    the optimizer at the last micro-batch of the accumulation). Returns (loss, parts).

    mb: a padded batch, or packed rows (packing.PackedCollator).
    norm: the loss normaliser (valid target tokens per rank and micro-batch; DeepSpeed
    averages over both); lam: the adversary's scale (adv_lambda). inject_nan: multiply the loss by NaN
    before the backward pass (fault injection, the trainer's --inject-nan)."""
    device = engine.device
    if isinstance(t_engine, TeacherOutputs):  # the teacher's outputs, cached
        teacher, gather = t_engine.op_inputs(mb, device), []
    else:
        th, tw = teacher_hidden(t_engine, mb, device)
        teacher, gather = {"teacher_hidden": th, "teacher_weight": tw}, [tw] if tw is not None else []
    packed = {k: mb[k].to(device) for k in ("position_ids", "seq_index", "question_index") if k in mb}
    with zero.GatheredParameters(gather, modifier_rank=None):
        loss, parts = engine(
            mb["input_ids"].to(device), mb["attention_mask"].to(device),
            mb["labels"].to(device), mb["domain_labels"].to(device), **teacher, adv_lambda=lam,
            num_valid_tokens=max(norm, 1e-9), temperature=temperature, alpha=alpha,
            use_domain=use_domain, **packed)
    if inject_nan:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()
    return loss, parts
