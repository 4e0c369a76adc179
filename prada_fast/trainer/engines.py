"""The DeepSpeed engines of a PRADA run and one micro-batch step on them.

Shared by the trainer (trainloop.py) and the training-step benchmarks
(benchmarks/train_step.py, benchmarks/tools/max_batch.py, benchmarks/tools/profiler.py), so that what
the benchmarks time is the trainer's own step:

    engine, teacher = build_engines(model, teacher_model, ds_cfg)
    loss, parts = micro_step(engine, teacher, mb, norm=..., lam=..., temperature=..., alpha=...)
"""
from __future__ import annotations

import torch
from deepspeed import zero

from prada_fast.common import distributed as dist_util
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
    teacher model (None: no teacher) is frozen, and sharded the same way when there are
    ranks to shard it over (`teacher_engine`), keeping up to teacher_memo_bytes of its
    outputs per record (teacher/live.py; 0: none)."""
    import deepspeed
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, head_lr_mult, ds_cfg), config=ds_cfg)
    share_master_weights(engine.optimizer)
    if not hasattr(engine.optimizer, "overflow"):  # stage 0 in fp32: torch's optimizer itself
        engine.optimizer = SkipNonFinite(engine.optimizer)
    return engine, None if teacher_model is None else LiveTeacher(
        teacher_engine(teacher_model, ds_cfg), teacher_memo_bytes)


def share_master_weights(optimizer) -> int:
    """Let ZeRO-3's fp32 master partitions share the storage of the partitions the model
    computes with when both are the same tensor in all but name (fp32 training, no offload):
    DeepSpeed means to alias them then (stage3.py, "we don't need another copy of the
    weights"), but in 0.19.8 its test compares the partition's torch.device with the
    accelerator's device name, a string ('cpu' on the CPU), which is never equal, so it
    keeps a second copy of every trainable weight. The optimizer updates the shared storage
    in place and DeepSpeed's copy of the master into the model's partition becomes a copy
    onto itself; checkpoints save and load the same values. Returns the bytes freed."""
    lp = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    fp = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    elsewhere = any(getattr(optimizer, a, False)  # the master lives on the CPU or on disk
                    for a in ("offload_optimizer", "swap_optimizer", "params_in_nvme_and_cpu"))
    if not lp or not fp or len(lp) != len(fp) or elsewhere:
        return 0
    freed = 0
    for low, master in zip(lp, fp):
        if low is None or master is None or low is master or master.data_ptr() == low.data_ptr():
            continue
        if low.dtype == master.dtype and low.device == master.device and low.shape == master.shape \
                and torch.equal(low, master):
            master.data = low.data
            freed += low.numel() * low.element_size()
    return freed


class SkipNonFinite:
    """Torch's optimizer, skipping a step whose gradients are not all finite, as ZeRO's and
    DeepSpeed's mixed-precision optimizers do: at ZeRO stage 0 in fp32 the engine steps the
    optimizer itself, which would write NaN into every weight. DeepSpeed's engine reads
    `overflow` after `step`: set, it counts the step in `skipped_steps`, does not advance
    the lr schedule, and zeroes the gradients as after any step. The rest (param_groups,
    state, state_dict for checkpoints) is the wrapped optimizer's."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.overflow = False

    def __getattr__(self, name):
        return getattr(self.__dict__["optimizer"], name)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not self.overflow:
            self.optimizer.step(closure)


class FrozenTeacher:
    """The teacher of a world of one: its model as it is (frozen, eval mode, in the run's
    precision, on the run's device), with the `module` and `device` attributes of a
    DeepSpeed engine, so that whatever reads a teacher engine (teacher_hidden,
    precompute_teacher) reads it."""

    def __init__(self, module, device):
        self.module = module
        self.device = torch.device(device)


def teacher_engine(teacher_model, ds_cfg: dict):
    """The teacher model, frozen (no grad, eval mode). Across several ranks: under ZeRO-3
    with the run's config and no optimizer (`dsconfig.inference_config`), each rank holding
    its shard. In a world of one there is nothing to shard: a DeepSpeed engine would only
    copy every weight into its partition (twice the teacher's size in memory while it does)
    and hook every layer, so the model stays a plain module (`FrozenTeacher`), cast to the
    precision the engine would give it (bf16 / fp16 when the config enables them; buffers
    kept) and moved to the device."""
    import deepspeed
    teacher_model.requires_grad_(False)
    teacher_model.eval()
    if dist_util.world_size() == 1:
        from deepspeed.accelerator import get_accelerator
        dtype = torch.bfloat16 if (ds_cfg.get("bf16") or {}).get("enabled") is True else \
            torch.float16 if (ds_cfg.get("fp16") or {}).get("enabled") is True else None
        if dtype is not None:
            for p in teacher_model.parameters():
                p.data = p.data.to(dtype)
        device = get_accelerator().current_device_name()
        return FrozenTeacher(teacher_model.to(device), device)
    t_engine, *_ = deepspeed.initialize(model=teacher_model, config=inference_config(ds_cfg))
    t_engine.eval()
    return t_engine


def micro_step(engine, teacher, mb: dict, *, norm: float, lam: float, temperature: float,
               alpha: float, use_domain: bool = True, lm_weight: float = 0.0, inject_nan: bool = False,
               keep_pooled: bool = False):
    """One micro-batch: the teacher's inputs (`teacher`: a TeacherSource, teacher/interface.py:
    live or cached; None without KD), student forward (the loss op, with the teacher's
    partitioned parameters gathered), `engine.backward` and `engine.step` (DeepSpeed
    applies the optimizer at the last micro-batch of the accumulation). Returns (loss, parts).

    mb: a padded batch, or packed rows (packing.PackedCollator).
    norm: the loss normaliser (valid target tokens per rank and micro-batch; DeepSpeed
    averages over both); lam: the adversary's scale (adv_lambda); lm_weight: the weight of
    the auxiliary language-model term on the questions (PradaModel.forward). inject_nan: multiply the
    loss by NaN before the backward pass (fault injection, the trainer's --inject-nan).
    keep_pooled: parts["pooled"] holds the detached pooled features and their domain labels
    (what --domain-steps trains the head on, trainer/domain_steps.py)."""
    device = engine.device
    inputs = teacher.op_inputs(mb, device) if teacher is not None else {}
    gather = list(teacher.partitioned) if teacher is not None else []
    packed = {k: mb[k].to(device) for k in ("position_ids", "seq_index", "question_index") if k in mb}
    with zero.GatheredParameters(gather, modifier_rank=None):
        loss, parts = engine(
            mb["input_ids"].to(device), mb["attention_mask"].to(device),
            mb["labels"].to(device), mb["domain_labels"].to(device), **inputs, adv_lambda=lam,
            num_valid_tokens=max(norm, 1e-9), temperature=temperature, alpha=alpha,
            use_domain=use_domain, lm_weight=lm_weight, keep_pooled=keep_pooled, **packed)
    if inject_nan:
        loss = loss * float("nan")
    engine.backward(loss)
    engine.step()
    return loss, parts
