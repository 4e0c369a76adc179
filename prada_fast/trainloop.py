"""The optimisation loop: one optimizer step per global batch, with gradient accumulation
over micro-batches, the GRL schedule, metrics.jsonl and periodic ZeRO checkpoints."""
from __future__ import annotations

import json
import time

import torch
from deepspeed import zero
from tqdm.auto import tqdm

from . import distributed as dist_util
from .grl import lambda_at

PARTS = ("loss", "ce", "kd", "dom", "dom_acc")


def _teacher_hidden(t_engine, mb, device):
    if t_engine is None:
        return None, None
    teacher = t_engine.module
    with torch.no_grad():
        backbone = getattr(teacher, teacher.base_model_prefix)
        th = backbone(input_ids=mb["input_ids"].to(device),
                      attention_mask=mb["attention_mask"].to(device), use_cache=False)
    return th.last_hidden_state, teacher.get_output_embeddings().weight


def train_steps(engine, t_engine, batches, args, *, start, out, ckpt_dir, log) -> dict:
    device = engine.device
    world = batches.world_size
    rank0 = dist_util.rank() == 0
    metrics = open(out / "metrics.jsonl", "a") if rank0 else None
    bar = tqdm(total=args.max_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not rank0 or args.no_progress)
    t_start, tokens_total, last, end = time.time(), 0, {}, start
    try:
        end = args.max_steps if not args.stop_after else min(args.max_steps, start + args.stop_after)
        for step in range(start, end):
            t0 = time.time()
            lam = 0.0 if args.no_domain_loss else lambda_at(
                args.grl_schedule, step, args.max_steps, args.lambda_max, args.grl_gamma)
            micro, n_valid = batches.step(step)
            norm = n_valid / (world * batches.accum)  # DeepSpeed averages over ranks and micro-steps
            sums = torch.zeros(len(PARTS) + 1, dtype=torch.float64)
            for mb in micro:
                th, tw = _teacher_hidden(t_engine, mb, device)
                with zero.GatheredParameters([tw] if tw is not None else [], modifier_rank=None):
                    loss, parts = engine(
                        mb["input_ids"].to(device), mb["attention_mask"].to(device),
                        mb["labels"].to(device), mb["domain_labels"].to(device),
                        teacher_hidden=th, teacher_weight=tw, grl_lambda=lam,
                        num_valid_tokens=max(norm, 1e-9), temperature=args.temperature,
                        alpha=args.alpha, use_domain=not args.no_domain_loss)
                engine.backward(loss)
                engine.step()
                vals = [loss.item()] + [float(parts[k]) for k in PARTS[1:]]
                sums += torch.tensor(vals + [float(mb["attention_mask"].sum())], dtype=torch.float64)
            means = dist_util.all_mean((sums[:-1] / len(micro)).tolist(), "cpu")
            tokens = int(sums[-1]) * world
            tokens_total += tokens
            dt = time.time() - t0
            last = dict(zip(PARTS, means))
            if rank0:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", dom_acc=f"{last['dom_acc']:.2f}",
                                lam=f"{lam:.2f}")
                if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                    row = {"step": step + 1, **{k: round(v, 6) for k, v in last.items()},
                           "grl_lambda": round(lam, 6), "lr": engine.get_lr()[0],
                           "tokens_per_s": round(tokens / max(dt, 1e-9), 1)}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end:
                engine.save_checkpoint(str(ckpt_dir), tag=f"step{step + 1}",
                                       client_state={"step": step + 1})
        if start < end:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{end}", client_state={"step": end})
    finally:
        bar.close()
        if metrics:
            metrics.close()
    elapsed = time.time() - t_start
    return {"steps": end, "final_loss": last.get("loss", float("nan")),
            "tokens_per_s": tokens_total / max(elapsed, 1e-9)}
