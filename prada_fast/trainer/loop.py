"""The optimisation loop: one optimizer step per global batch, with gradient accumulation
over micro-batches, the GRL schedule, metrics.jsonl and periodic ZeRO checkpoints.

Bad numerics: a step whose loss or gradient is not finite never reaches the weights.
DeepSpeed's ZeRO-3 optimizer already discards a step whose global gradient norm is not
finite (it zeroes the gradients and counts the step in `engine.skipped_steps`); the loop
counts such steps, logs them, and after `max_bad_steps` of them in a row stops with a
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
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from prada_fast.trainer import checkpoint
from prada_fast.common import distributed as dist_util
from prada_fast.trainer.engines import micro_step
from prada_fast.op import lambda_at
from prada_fast.trainer.packing import position_counts
from prada_fast.trainer.preemption import Preempted, StopRequest
from prada_fast.trainer.rundir import RunDir

PARTS = ("loss", "ce", "kd", "dom", "dom_acc", "mmd", "lm")  # mmd: --adversary mmd only; lm: --lm-weight


class BadNumerics(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of the run's flags (README and `--help` say what each means)."""
    max_steps: int = 1000
    stop_after: int = 0                 # end after this many steps of this invocation (0: never)
    save_every: int = 250
    keep_checkpoints: int = 0
    log_every: int = 10
    probe_every: int = 0
    max_bad_steps: int = 5
    inject_nan: frozenset = frozenset()  # 1-based steps whose loss is made NaN (tests)
    show_progress: bool = True
    tensorboard: bool = False
    # the objective
    alpha: float = 0.5
    temperature: float = 1.0
    use_domain: bool = True
    lm_weight: float = 0.0              # the auxiliary language-model term on the questions
    adversary: str = "confusion"
    lambda_schedule: str = "dann"
    lambda_max: float = 1.0
    lambda_gamma: float = 10.0

    def lam(self, step: int) -> float:
        """The adversarial scale of 0-based `step`."""
        if not self.use_domain:
            return 0.0
        return lambda_at(self.lambda_schedule, step, self.max_steps, self.lambda_max, self.lambda_gamma)


@dataclass
class Totals:
    """The loop's running totals over this invocation's steps."""
    tokens: int = 0           # real tokens (no padding, no soft prompt), every rank
    padding: int = 0
    positions: int = 0
    skipped: int = 0          # steps with a non-finite loss or gradient, the run's (resume included)
    bad_in_row: int = 0
    no_labels: int = 0        # steps whose batch held no labelled token
    last: dict = field(default_factory=dict)   # the last step's parts, averaged over ranks
    end: int = 0              # the last step done

    def add(self, *, tokens: int, padding: int, positions: int, bad: bool, no_labels: bool) -> None:
        self.tokens += tokens
        self.padding += padding
        self.positions += positions
        self.skipped += bad
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        self.no_labels += no_labels

    def summary(self, elapsed: float) -> dict:
        return {"steps": self.end, "final_loss": self.last.get("loss", float("nan")),
                "final_parts": self.last, "padding_fraction": self.padding / max(self.positions, 1),
                "real_tokens": self.tokens, "skipped_steps": self.skipped,
                "steps_without_labels": self.no_labels,
                "tokens_per_s": self.tokens / max(elapsed, 1e-9)}


def _optimizer_step(engine, teacher, micro, *, norm, lam, settings: LoopSettings, inject_nan: bool,
                    pooled: list | None = None):
    """Forward/backward of every micro-batch and the optimizer step; returns the summed
    parts, and the real tokens, padding and positions of this rank (`packing.position_counts`).
    inject_nan: a NaN loss in the first micro-batch. pooled: a list that receives each
    micro-batch's detached pooled features and domain labels (--domain-steps)."""
    sums = torch.zeros(len(PARTS) + 3, dtype=torch.float64)
    for i, mb in enumerate(micro):
        loss, parts = micro_step(engine, teacher, mb, norm=norm, lam=lam,
                                 temperature=settings.temperature, alpha=settings.alpha,
                                 use_domain=settings.use_domain, lm_weight=settings.lm_weight,
                                 inject_nan=inject_nan and i == 0, keep_pooled=pooled is not None)
        if pooled is not None:
            pooled.append(parts.pop("pooled"))
        vals = [loss.item()] + [float(parts.get(k, 0.0)) for k in PARTS[1:]]
        sums += torch.tensor(vals + list(position_counts(mb, engine.module.n_prompt)),
                             dtype=torch.float64)
    return sums


def tensorboard_writer(enabled: bool, run: RunDir):
    """A TensorBoard SummaryWriter on DIR/tensorboard when `enabled`, else None."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(run.tensorboard))


def train_steps(engine, teacher, batches, settings: LoopSettings, *, start, run: RunDir, ckpt_dir,
                log, skipped=0, probe_batches=None, head_steps=None) -> dict:
    """Steps start+1 .. max_steps (or stop_after of them), metrics into `run`, checkpoints
    into `ckpt_dir` (run.checkpoints in a training run). teacher: the live teacher's engine,
    a teacher cache's reader, or None. probe_batches: held-out batches for probe_every's
    curve of the head's and a fresh probe's domain accuracy. head_steps: the domain head's
    own updates after each good step (--domain-steps, domain_steps.HeadSteps), checkpointed
    with the rest."""
    world = batches.world_size
    rank0 = dist_util.rank() == 0
    metrics = open(run.metrics, "a") if rank0 else None  # noqa: SIM115
    board = tensorboard_writer(settings.tensorboard, run) if rank0 else None
    bar = tqdm(total=settings.max_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not rank0 or not settings.show_progress)
    t_start, totals = time.time(), Totals(skipped=skipped, end=start)

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, {"skipped_steps": totals.skipped},
                        keep=settings.keep_checkpoints,
                        rank_state=None if head_steps is None else {"domain_head": head_steps.state_dict()})

    stop = StopRequest()
    try:
        stop.__enter__()  # SIGTERM/SIGUSR1 only set a flag until the loop ends
        end = settings.max_steps if not settings.stop_after else min(settings.max_steps,
                                                                     start + settings.stop_after)
        totals.end = end
        for step in range(start, end):
            t0 = time.time()
            lam = settings.lam(step)
            micro, n_valid = batches.step(step)
            norm = n_valid / (world * batches.accum)  # DeepSpeed averages over ranks and micro-steps
            skipped_before, lr = engine.skipped_steps, engine.get_lr()[0]  # the lr this step uses
            pooled = [] if head_steps is not None else None
            try:
                sums = _optimizer_step(engine, teacher, micro, norm=norm, lam=lam, settings=settings,
                                       inject_nan=rank0 and step + 1 in settings.inject_nan, pooled=pooled)
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
            if head_steps is not None and not bad:  # every rank alike: `bad` is the same on all
                head_steps.step(pooled, lr)
            totals.add(tokens=tokens, padding=padding, positions=positions, bad=bad,
                       no_labels=n_valid == 0)
            dt = time.time() - t0
            last = totals.last = dict(zip(PARTS, means))
            if settings.adversary != "mmd" or not settings.use_domain:
                del last["mmd"]
            if not settings.lm_weight:
                del last["lm"]
            probed = None
            if probe_batches and settings.probe_every and (
                    (step + 1) % settings.probe_every == 0 or step + 1 == settings.max_steps):
                from prada_fast.trainer.evaluation import alignment_probe  # every rank: a ZeRO-3 forward
                probed = alignment_probe(engine.module, probe_batches, fit=rank0)
            if rank0:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", dom_acc=f"{last['dom_acc']:.2f}",
                                lam=f"{lam:.2f}", skipped=totals.skipped)
                if bad:
                    log(f"step {step + 1}: non-finite loss or gradient; step skipped, weights "
                        f"unchanged ({totals.bad_in_row} in a row, {totals.skipped} in all)")
                if n_valid == 0:
                    log(f"step {step + 1}: no labelled token in this batch (only target-domain "
                        "records, or records cut by --max-len): the task loss is 0, only the "
                        "domain loss trained")
                if (bad or n_valid == 0 or probed or (step + 1) % settings.log_every == 0
                        or step + 1 == settings.max_steps):
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
            if totals.bad_in_row >= settings.max_bad_steps:
                save(step + 1)
                raise BadNumerics(
                    f"{totals.bad_in_row} steps in a row (up to step {step + 1}) had a non-finite loss "
                    f"or gradient; stopped. The weights are those of the last good step, saved in "
                    f"{ckpt_dir / f'step{step + 1}'} (lower --lr, check the data, then --resume)")
            saved = settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < end
            if saved:
                save(step + 1)
            if stopping:
                if not saved:
                    save(step + 1)
                raise Preempted(step + 1, settings.max_steps, ckpt_dir / f"step{step + 1}",
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
    return totals.summary(time.time() - t_start)
