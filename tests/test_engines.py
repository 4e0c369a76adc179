"""The engines of a world of one (prada_fast/trainer/engines.py, dsconfig.py): the student
trains at ZeRO stage 0 (non-finite steps skipped as ZeRO skips them), or with
--one-rank-zero keep at ZeRO-3, whose fp32 master shares the weights' storage; the teacher
is a plain frozen module, and the "auto" bucket sizes follow the world size; the losses
are those of the former set-up (a ZeRO-3 teacher engine, a separate master copy,
DeepSpeed's default buckets)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prada_fast.trainer.dsconfig import (DEEPSPEED_BUCKETS, WORLD_OF_ONE_BUCKETS, ConfigError,
                                         load_ds_config, one_rank_stage, zero_buckets)
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **zero):
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"].update(zero)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("world", [1, 2])
def test_auto_buckets_follow_the_world_size(tmp_path, world):
    cfg = load_ds_config(_cfg(tmp_path), world_size=world, device=torch.device("cpu"), max_steps=4)
    want = WORLD_OF_ONE_BUCKETS if world == 1 else DEEPSPEED_BUCKETS
    assert zero_buckets(world) == want
    for key, value in want.items():
        assert cfg["zero_optimization"][key] == value
    # a value the config sets is kept
    cfg = load_ds_config(_cfg(tmp_path, reduce_bucket_size=12345), world_size=world,
                         device=torch.device("cpu"), max_steps=4)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 12345


def test_a_world_of_one_trains_at_stage_0_unless_told_or_offloaded_or_mixed_precision(tmp_path):
    cpu = torch.device("cpu")
    heard = []
    cfg = load_ds_config(_cfg(tmp_path), world_size=1, device=cpu, max_steps=4, log=heard.append)
    assert cfg["zero_optimization"]["stage"] == 0
    assert len(heard) == 1 and "stage 3 in a world of one" in heard[0] and "--one-rank-zero keep" in heard[0]
    heard.clear()
    for kwargs in ({"world_size": 2}, {"world_size": 1, "one_rank_zero": "keep"}):
        cfg = load_ds_config(_cfg(tmp_path), device=cpu, max_steps=4, log=heard.append, **kwargs)
        assert cfg["zero_optimization"]["stage"] == 3, kwargs
    assert not heard
    base = json.loads(_cfg(tmp_path).read_text())
    for change in ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
                   {"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme"}}},
                   {"bf16": {"enabled": True}}, {"fp16": {"enabled": True}}):
        want = {**base, **change}["zero_optimization"]["stage"]
        assert one_rank_stage({**base, **change}, 1) == want, change
    assert one_rank_stage({**base, "zero_optimization": {"stage": 1}}, 1) == 0
    no_offload = {"stage": 2, "offload_optimizer": {"device": "none"}}
    assert one_rank_stage({**base, "zero_optimization": no_offload}, 1) == 0
    assert one_rank_stage({"train_batch_size": 4}, 1) == 0  # no ZeRO section: stage 0 already
    with pytest.raises(ConfigError, match="one_rank_zero"):
        one_rank_stage(base, 1, "sometimes")


# Run in a child process (a world of one of its own): 3 steps through build_engines at stage 0
# (the default) and at ZeRO-3 (--one-rank-zero keep), and the same 3 steps with the former
# engines (the teacher under ZeRO-3, no shared master, DeepSpeed's
# default buckets), from the same weights and batches.
SCRIPT = r"""
import json, sys
import torch
from prada_fast.common import distributed as dist_util
from prada_fast.common.flags import DEFAULT_DS
from prada_fast.models import PradaConfig, PradaModel, load_causal_lm
from prada_fast.teacher.live import LiveTeacher
from prada_fast.trainer import engines
from prada_fast.trainer.dsconfig import DEEPSPEED_BUCKETS, load_ds_config
from prada_fast.trainer.packing import PackedCollator
import deepspeed

info = dist_util.setup(5.0)
g = torch.Generator().manual_seed(0)
exs = []
for _ in range(8):
    L = int(torch.randint(6, 30, (1,), generator=g)); ids = torch.randint(3, 259, (L,), generator=g).tolist()
    q = L // 3
    exs.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "domain": 0,
                "n_labels": L - q - 1})
collate = PackedCollator(0, 0, 64)
out = {}
for mode in ("stage0", "new", "former"):
    cfg = load_ds_config(DEFAULT_DS, world_size=1, device=info.device, max_steps=3, lr=1e-2,
                         one_rank_zero="skip" if mode == "stage0" else "keep")
    cfg.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1)
    cfg.pop("scheduler")
    student = load_causal_lm("tiny", seed=1)[0]
    model = PradaModel(student, PradaConfig(n_domains=2, n_prompt=0))
    teacher = load_causal_lm("tiny-teacher", seed=2)[0]
    if mode == "stage0":
        engine, live = engines.build_engines(model, teacher, cfg)
        out["stage0_engine"] = [engine.zero_optimization_stage(), type(engine.optimizer).__name__,
                         any(hasattr(p, "ds_id") for p in model.parameters())]
    elif mode == "new":
        engine, live = engines.build_engines(model, teacher, cfg)
        opt = engine.optimizer
        out["teacher_kind"] = type(live.engine).__name__
        out["teacher_device"] = str(live.engine.device)
        out["teacher_zero"] = any(hasattr(p, "ds_id") for p in teacher.parameters())
        out["teacher_grad"] = any(p.requires_grad for p in teacher.parameters())
        out["shared"] = [a.data_ptr() == b.data_ptr() for a, b in
                         zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)]
        before = opt.fp16_partitioned_groups_flat[0].clone()
    else:
        cfg["zero_optimization"].update(DEEPSPEED_BUCKETS)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=engines.param_groups(model, 1.0, cfg),
                                          config=cfg)
        live = LiveTeacher(deepspeed.initialize(model=teacher.requires_grad_(False).eval(),
                                                config=engines.inference_config(cfg))[0])
    losses = []
    for i in range(3):
        batch = exs[4 * (i % 2):4 * (i % 2) + 4]
        loss, _ = engines.micro_step(engine, live, collate(batch), norm=sum(e["n_labels"] for e in batch),
                                     lam=0.0, temperature=2.0, alpha=0.5, use_domain=False)
        losses.append(float(loss.detach()))
    out[mode] = losses
    if mode == "stage0":  # a NaN loss: the step skipped, weights unchanged, gradients zeroed
        weights = [p.detach().clone() for p in model.parameters()]
        skipped = engine.skipped_steps
        engines.micro_step(engine, live, collate(exs[:4]), norm=1.0, lam=0.0, temperature=2.0,
                           alpha=0.5, use_domain=False, inject_nan=True)
        out["nan_skipped"] = engine.skipped_steps - skipped
        out["nan_unchanged"] = all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
        out["nan_grads_zero"] = all(p.grad is None or not p.grad.any() for p in model.parameters())
        loss, _ = engines.micro_step(engine, live, collate(exs[:4]), norm=1.0, lam=0.0,
                                     temperature=2.0, alpha=0.5, use_domain=False)
        out["after_nan"] = [float(loss.detach()), engine.skipped_steps - skipped,
                            all(torch.isfinite(p).all() for p in model.parameters())]
    if mode == "new":  # the optimizer's update reached the weights the model computes with
        low, master = opt.fp16_partitioned_groups_flat[0], opt.fp32_partitioned_groups_flat[0]
        out["moved"] = not torch.equal(before, low)
        out["same"] = torch.equal(low, master)
print("RESULT " + json.dumps(out))
dist_util.teardown()
"""


def test_world_of_one_engines_give_the_former_losses_with_less_memory():
    env_drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    import os
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["teacher_kind"] == "FrozenTeacher" and r["teacher_device"] == "cpu"
    assert not r["teacher_zero"] and not r["teacher_grad"]
    assert r["shared"] and all(r["shared"])
    assert r["moved"] and r["same"]
    for a, b in zip(r["new"], r["former"]):
        assert abs(a - b) <= 1e-6 * abs(b), (r["new"], r["former"])
    assert r["stage0_engine"] == [0, "SkipNonFinite", False]
    for a, b in zip(r["stage0"], r["former"]):
        assert abs(a - b) <= 1e-6 * abs(b), (r["stage0"], r["former"])
    assert r["nan_skipped"] == 1 and r["nan_unchanged"] and r["nan_grads_zero"]
    assert math.isfinite(r["after_nan"][0]) and r["after_nan"][1:] == [1, True]
