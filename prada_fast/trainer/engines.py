"""The DeepSpeed engines of a PRADA run and one micro-batch step on them.

Shared by the trainer (trainloop.py) and the training-step benchmarks
(benchmarks/train_step.py, benchmarks/tools/max_batch.py, benchmarks/tools/profiler.py), so that what
the benchmarks time is the trainer's own step:

    engine, teacher = build_engines(model, teacher_model, ds_cfg)
    loss, parts = micro_step(engine, teacher, mb, norm=..., lam=..., temperature=..., alpha=...)
"""
from __future__ import annotations

from deepspeed import zero

from prada_fast.teacher.live import LiveTeacher
from prada_fast.trainer.dsconfig import ConfigError, inference_config


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


def build_engines(model, teacher_model, ds_cfg: dict, head_lr_mult: float = 1.0,
                  teacher_memo_bytes: int = 0):
    """(engine, LiveTeacher or None): the student (a PradaModel) trains its parameters
    that require grad under `ds_cfg` (the domain head at head_lr_mult x the lr); the
    teacher model (None: no teacher) is frozen and sharded the same way (`teacher_engine`),
    keeping up to teacher_memo_bytes of its outputs per record (teacher/live.py; 0: none)."""
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, head_lr_mult, ds_cfg), config=ds_cfg)
    return engine, None if teacher_model is None else LiveTeacher(
        teacher_engine(teacher_model, ds_cfg), teacher_memo_bytes)


def teacher_engine(teacher_model, ds_cfg: dict):
    """The teacher model, frozen (no grad, eval mode), under ZeRO-3 with the run's config
    and no optimizer (`dsconfig.inference_config`)."""
    import deepspeed
    teacher_model.requires_grad_(False)
    teacher_model.eval()
    t_engine, *_ = deepspeed.initialize(model=teacher_model, config=inference_config(ds_cfg))
    t_engine.eval()
    return t_engine


def micro_step(engine, teacher, mb: dict, *, norm: float, lam: float, temperature: float,
               alpha: float, use_domain: bool = True, lm_weight: float = 0.0, inject_nan: bool = False):
    """One micro-batch: the teacher's inputs (`teacher`: a TeacherSource, teacher/interface.py:
    live or cached; None without KD), student forward (the loss op, with the teacher's
    partitioned parameters gathered), `engine.backward` and `engine.step` (DeepSpeed
    applies the optimizer at the last micro-batch of the accumulation). Returns (loss, parts).

    mb: a padded batch, or packed rows (packing.PackedCollator).
    norm: the loss normaliser (valid target tokens per rank and micro-batch; DeepSpeed
    averages over both); lam: the adversary's scale (adv_lambda); lm_weight: the weight of
    the auxiliary language-model term on the questions (PradaModel.forward). inject_nan: multiply the
    loss by NaN before the backward pass (fault injection, the trainer's --inject-nan)."""
    device = engine.device
    inputs = teacher.op_inputs(mb, device) if teacher is not None else {}
    gather = list(teacher.partitioned) if teacher is not None else []
    packed = {k: mb[k].to(device) for k in ("position_ids", "seq_index", "question_index") if k in mb}
    with zero.GatheredParameters(gather, modifier_rank=None):
        loss, parts = engine(
            mb["input_ids"].to(device), mb["attention_mask"].to(device),
            mb["labels"].to(device), mb["domain_labels"].to(device), **inputs, adv_lambda=lam,
            num_valid_tokens=max(norm, 1e-9), temperature=temperature, alpha=alpha,
            use_domain=use_domain, lm_weight=lm_weight, **packed)
    if inject_nan:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()
    return loss, parts
