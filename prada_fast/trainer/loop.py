"""The optimisation loop: one optimizer step per global batch, with gradient accumulation
over micro-batches, the GRL schedule, metrics.jsonl and periodic ZeRO checkpoints.

Bad numerics: a step whose loss or gradient is not finite never reaches the weights.
DeepSpeed's ZeRO-3 optimizer already discards a step whose global gradient norm is not
finite (it zeroes the gradients and counts the step in `engine.skipped_steps`); the loop
counts such steps, logs them, and after `--max-bad-steps` of them in a row stops with a
checkpoint of the last good state.

Preemption (preemption.py): a SIGTERM or SIGUSR1 to any rank, or the death of the
DeepSpeed launcher, sets a flag that the per-step all-reduce carries to every rank; all
ranks then stop after the same step, save a checkpoint and raise Preempted.

A step whose global batch holds no labelled token (only target-domain records, or records
cut by --max-len) trains the domain loss alone; it is logged and marked in metrics.jsonl
("no_labels": true), never silent."""
from __future__ import annotations

import json
import math
import time

import torch
from tqdm.auto import tqdm

from prada_fast.trainer import checkpoint
from prada_fast.common import distributed as dist_util
from prada_fast.trainer.engines import micro_step
from prada_fast.op import lambda_at
from prada_fast.trainer.packing import position_counts
from prada_fast.trainer.preemption import Preempted, StopRequest

PARTS = ("loss", "ce", "kd", "dom", "dom_acc", "mmd")  # mmd: --adversary mmd only


class BadNumerics(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def _optimizer_step(engine, teacher, micro, *, norm, lam, args, inject_nan: bool):
    """Forward/backward of every micro-batch and the optimizer step; returns the summed
    parts, and the real tokens, padding and positions of this rank (`packing.position_counts`).
    inject_nan: a NaN loss in the first micro-batch."""
    sums = torch.zeros(len(PARTS) + 3, dtype=torch.float64)
    for i, mb in enumerate(micro):
        loss, parts = micro_step(engine, teacher, mb, norm=norm, lam=lam,
                                 temperature=args.temperature, alpha=args.alpha,
                                 use_domain=not args.no_domain_loss,
                                 inject_nan=inject_nan and i == 0)
        vals = [loss.item()] + [float(parts.get(k, 0.0)) for k in PARTS[1:]]
        sums += torch.tensor(vals + list(position_counts(mb, engine.module.n_prompt)),
                             dtype=torch.float64)
    return sums


def tensorboard_writer(args, out):
    """A TensorBoard SummaryWriter on DIR/tensorboard with --report-to tensorboard, else None."""
    if getattr(args, "report_to", "none") != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(out / "tensorboard"))


def train_steps(engine, t_engine, batches, args, *, start, out, ckpt_dir, log, skipped=0,
                probe_batches=None) -> dict:
    """Steps start+1 .. max_steps (or --stop-after of them). probe_batches: held-out batches
    for --probe-every's curve of the head's and a fresh probe's domain accuracy."""
    world = batches.world_size
    rank0 = dist_util.rank() == 0
    metrics = open(out / "metrics.jsonl", "a") if rank0 else None  # noqa: SIM115
    board = tensorboard_writer(args, out) if rank0 else None
    bar = tqdm(total=args.max_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not rank0 or args.no_progress)
    inject = {int(s) for s in args.inject_nan.split(",") if s} if args.inject_nan else set()
    t_start, tokens_total, padding_total, last, end = time.time(), 0, 0, {}, start
    positions_total = 0
    bad_in_row = no_labels = 0
    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, {"skipped_steps": skipped}, keep=args.keep_checkpoints)

    stop = StopRequest()
    try:
        stop.__enter__()  # SIGTERM/SIGUSR1 only set a flag until the loop ends
        end = args.max_steps if not args.stop_after else min(args.max_steps, start + args.stop_after)
        for step in range(start, end):
            t0 = time.time()
            lam = 0.0 if args.no_domain_loss else lambda_at(
                args.grl_schedule, step, args.max_steps, args.lambda_max, args.grl_gamma)
            micro, n_valid = batches.step(step)
            norm = n_valid / (world * batches.accum)  # DeepSpeed averages over ranks and micro-steps
            skipped_before, lr = engine.skipped_steps, engine.get_lr()[0]  # the lr this step uses
            try:
                sums = _optimizer_step(engine, t_engine, micro, norm=norm, lam=lam, args=args,
                                       inject_nan=rank0 and step + 1 in inject)
            except (RuntimeError, dist_util.DistError) as e:
                dist_util.raise_if_peer_failed(e, f"step {step + 1}")
                raise
            # the parts' means over ranks, the tokens' sums, and whether any rank was asked to stop
            means = dist_util.all_mean((sums[:-3] / len(micro)).tolist() + sums[-3:].tolist()
                                       + [float(stop.requested())], engine.device)
            stopping = means.pop() > 0
            positions = round(means.pop() * world)
            padding = round(means.pop() * world)
            tokens = round(means.pop() * world)  # real tokens, every rank
            bad = engine.skipped_steps > skipped_before or not all(map(math.isfinite, means[:4]))
            skipped += bad
            bad_in_row = bad_in_row + 1 if bad else 0
            no_labels += n_valid == 0
            tokens_total += tokens
            padding_total += padding
            positions_total += positions
            dt = time.time() - t0
            last = dict(zip(PARTS, means))
            if getattr(args, "adversary", None) != "mmd" or args.no_domain_loss:
                del last["mmd"]
            probed = None
            if probe_batches and args.probe_every and (
                    (step + 1) % args.probe_every == 0 or step + 1 == args.max_steps):
                from prada_fast.trainer.evaluation import alignment_probe  # every rank: a ZeRO-3 forward
                probed = alignment_probe(engine.module, probe_batches, fit=rank0)
            if rank0:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", dom_acc=f"{last['dom_acc']:.2f}",
                                lam=f"{lam:.2f}", skipped=skipped)
                if bad:
                    log(f"step {step + 1}: non-finite loss or gradient; step skipped, weights "
                        f"unchanged ({bad_in_row} in a row, {skipped} in all)")
                if n_valid == 0:
                    log(f"step {step + 1}: no labelled token in this batch (only target-domain "
                        "records, or records cut by --max-len): the task loss is 0, only the "
                        "domain loss trained")
                if (bad or n_valid == 0 or probed or (step + 1) % args.log_every == 0
                        or step + 1 == args.max_steps):
                    # "grl_lambda": the adversary's scale (adv_lambda), under the key users read
                    row = {"step": step + 1, **{k: round(v, 6) for k, v in last.items()},
                           "grl_lambda": round(lam, 6), "lr": lr,
                           "tokens_per_s": round(tokens / max(dt, 1e-9), 1),
                           "padding_fraction": round(padding / max(positions, 1), 4), **(probed or {})}
                    if bad:
                        row["skipped"] = True
                    if n_valid == 0:
                        row["no_labels"] = True
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if board:
                        for key, value in row.items():
                            if key != "step" and not isinstance(value, bool) and value is not None:
                                board.add_scalar(f"train/{key}", value, step + 1)
            if bad_in_row >= args.max_bad_steps:
                save(step + 1)
                raise BadNumerics(
                    f"{bad_in_row} steps in a row (up to step {step + 1}) had a non-finite loss or "
                    f"gradient; stopped. The weights are those of the last good step, saved in "
                    f"{ckpt_dir / f'step{step + 1}'} (lower --lr, check the data, then --resume)")
            saved = args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end
            if saved:
                save(step + 1)
            if stopping:
                if not saved:
                    save(step + 1)
                raise Preempted(step + 1, args.max_steps, ckpt_dir / f"step{step + 1}",
                                stop.reason or "a stop signal to another rank")
        if start < end:
            save(end)
    finally:
        stop.__exit__(None, None, None)
        bar.close()
        if metrics:
            metrics.close()
        if board:
            board.close()
    elapsed = time.time() - t_start
    return {"steps": end, "final_loss": last.get("loss", float("nan")), "final_parts": last,
            "padding_fraction": padding_total / max(positions_total, 1), "real_tokens": tokens_total,
            "skipped_steps": skipped,
            "steps_without_labels": no_labels, "tokens_per_s": tokens_total / max(elapsed, 1e-9)}
