"""Reading a DeepSpeed config and filling its "auto" values for this run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A DeepSpeed config that cannot be used (not JSON, contradictory batch sizes...)."""


def load_ds_config(path: str | Path, *, world_size: int, device: torch.device, max_steps: int,
                   lr: float | None = None, warmup_steps: int | None = None,
                   one_rank_zero: str = "skip", log=None) -> dict:
    """The config with "auto" filled: bf16 on when the device supports it (CUDA with bf16),
    fp32 otherwise; micro batch from train_batch_size / (accumulation x world size);
    ZeRO's reduce_bucket_size and sub_group_size from the world size (`zero_buckets`);
    scheduler lengths from max_steps (an "auto" warm-up: warmup_steps when given, else a
    twentieth of the run); in a world of one, ZeRO's stage 0 where partitioning buys
    nothing (`one_rank_stage`; one_rank_zero "keep": the config's stage; `log` hears
    of the change)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start:e.start + 1].hex()} at "
                          f"offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for section in ("bf16", "fp16", "optimizer", "scheduler", "zero_optimization"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise ConfigError(f"{path}: field {section!r} must be a JSON object, got "
                              f"{type(cfg[section]).__name__}")
    for section in ("optimizer", "scheduler"):
        if "params" in cfg.get(section, {}) and not isinstance(cfg[section]["params"], dict):
            raise ConfigError(f"{path}: field {section}.params must be a JSON object")
    if lr is not None and not cfg.get("optimizer"):
        raise ConfigError(f"{path}: --lr sets the optimizer's lr, but the config has no optimizer")
    cfg = copy.deepcopy(cfg)

    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device.type == "cuda" and torch.cuda.is_bf16_supported()
    fp16 = cfg.get("fp16", {})
    if fp16.get("enabled") == "auto":
        fp16["enabled"] = False

    tbs = cfg.get("train_batch_size", "auto")
    mbs = cfg.get("train_micro_batch_size_per_gpu", "auto")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    known = {k: v for k, v in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mbs),
                               ("gradient_accumulation_steps", gas)) if v != "auto"}
    for k, v in known.items():
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{path}: field {k!r} must be a positive integer, got {v!r}")
    if gas == "auto":
        gas = 1 if tbs == "auto" or mbs == "auto" else tbs // (mbs * world_size)
    if tbs == "auto" and mbs == "auto":
        raise ConfigError(f"{path}: set train_batch_size or train_micro_batch_size_per_gpu")
    if mbs == "auto":
        mbs = tbs // (gas * world_size)
    if tbs == "auto":
        tbs = mbs * gas * world_size
    if mbs <= 0 or gas <= 0 or tbs != mbs * gas * world_size:
        raise ConfigError(
            f"{path}: batch sizes contradict each other: train_batch_size={tbs} must equal "
            f"train_micro_batch_size_per_gpu={mbs} x gradient_accumulation_steps={gas} x "
            f"world size {world_size}")
    cfg.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs,
               gradient_accumulation_steps=gas)

    zero = cfg.get("zero_optimization") or {}
    for key, value in zero_buckets(world_size).items():
        if zero.get(key) == "auto":
            zero[key] = value
    stage = one_rank_stage(cfg, world_size, one_rank_zero)
    if stage != zero.get("stage", 0):
        if log:
            log(f"{path}: ZeRO stage {zero['stage']} in a world of one partitions nothing; "
                f"training at stage {stage} (the same optimizer and losses, without ZeRO's per-step "
                "bookkeeping; --one-rank-zero keep for the config's stage)")
        zero["stage"] = stage

    opt = cfg.get("optimizer")
    if opt and lr is not None:
        opt.setdefault("params", {})["lr"] = lr
    sched = cfg.get("scheduler", {}).get("params", {})
    for key in ("total_num_steps", "warmup_num_steps", "warmup_max_lr"):
        if sched.get(key) == "auto":
            sched[key] = {"total_num_steps": max_steps,
                          "warmup_num_steps": warmup_steps or max(1, max_steps // 20),
                          "warmup_max_lr": (opt or {}).get("params", {}).get("lr", 1e-3)}[key]
    return cfg


# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py), kept across several ranks
DEEPSPEED_BUCKETS = {"reduce_bucket_size": 500_000_000, "sub_group_size": 1_000_000_000}
# a world of one: nothing to reduce, and the optimizer step's temporaries bounded
WORLD_OF_ONE_BUCKETS = {"reduce_bucket_size": 5_000_000, "sub_group_size": 10_000_000}


def zero_buckets(world_size: int) -> dict:
    """The "auto" values of ZeRO-3's bucket sizes (elements). Several ranks: DeepSpeed's
    defaults. A world of one (benchmarks/RESULTS.md, "Where prada_fast's memory goes"):
    - reduce_bucket_size: every gradient is copied into this bucket before its reduction,
      which in a world of one moves nothing; the bucket (5e8 elements by default, reserved
      whole, touched up to the trainable parameters' size) only holds a second copy of the
      gradients, so it is kept small (5e6: 20 MB in fp32);
    - sub_group_size: the optimizer steps over sub-groups of this many elements, and each
      sub-group's step flattens its gradients into a new tensor and runs AdamW's foreach
      arithmetic with temporaries of its size; at DeepSpeed's 1e9 every model here is one
      sub-group and these temporaries are several copies of the whole student at once, the
      peak of the step. 1e7 bounds them to the largest parameter (a sub-group holds whole
      parameters); the few more optimizer calls were not timed apart (the tokens/s in
      RESULTS.md include them)."""
    return dict(WORLD_OF_ONE_BUCKETS if world_size == 1 else DEEPSPEED_BUCKETS)


ONE_RANK_ZERO = ("skip", "keep")


def one_rank_stage(cfg: dict, world_size: int, one_rank_zero: str = "skip") -> int:
    """The ZeRO stage to train at. Across ranks, and with one_rank_zero "keep": the
    config's. In a world of one ZeRO shards over a single rank, so every stage only adds
    bookkeeping: ZeRO-3 hooks every module to gather and release its parameters (views of
    the whole partition here), copies every gradient into a reduce bucket and the
    partitions, and steps over flat buffers; on the tiny preset a step costs 2.4x that of
    stage 0 (benchmarks/RESULTS.md, "ZeRO in a world of one"). So a world of one trains at
    stage 0 (the model's own parameters and gradients, DeepSpeed's engine, optimizer,
    scheduler, clipping and checkpoints as before) when its weights are fp32 and nothing is
    offloaded. Kept: offload (ZeRO-Offload on one GPU is how a model too large for it
    trains) and bf16/fp16, whose stage-0 optimizers in DeepSpeed (a bf16 DDP wrapper) were
    not measured here."""
    if one_rank_zero not in ONE_RANK_ZERO:
        raise ConfigError(f"one_rank_zero must be one of {', '.join(ONE_RANK_ZERO)}, got {one_rank_zero!r}")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    offloaded = any((zero.get(k) or {}).get("device", "none") not in ("none", None)
                    for k in ("offload_optimizer", "offload_param"))
    low_precision = any((cfg.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    if world_size > 1 or one_rank_zero == "keep" or offloaded or low_precision:
        return stage
    return 0


def check_with_deepspeed(cfg: dict, path: str | Path) -> None:
    """Let DeepSpeed parse the filled config now (after the process group exists, before
    any work), so that a field it refuses (a typo, a wrong type) is one line naming the
    file rather than a traceback from deepspeed.initialize after the models are built."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    try:
        DeepSpeedConfig(copy.deepcopy(cfg))
    except (DeepSpeedConfigError, ValueError, AssertionError, TypeError, KeyError) as e:
        text = " ".join(str(e).split())
        raise ConfigError(f"{path}: DeepSpeed refuses it ({type(e).__name__}: {text[:300]})") from e


def inference_config(cfg: dict) -> dict:
    """The same ZeRO config for a frozen model: no optimizer, no scheduler."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg.pop("gradient_clipping", None)
    return cfg
