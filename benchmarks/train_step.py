"""One training-step benchmark case in this (fresh) process: student + frozen teacher
under DeepSpeed in a world of one (ZeRO stage 0 in fp32, as the trainer runs it;
ZeRO-3 in bf16), the trainer's own forward (PradaModel, the loss op
with --loss-impl) and teacher pass, on a fixed random batch.

    python -m benchmarks.train_step --loss-impl chunked [--student tiny --teacher tiny-teacher
        --vocab 32000 --batch 8 --seq 256 --min-seq 256 --packing --warmup 2 --steps 3]
        [--json out.json]

`warmup` steps first (allocator, optimizer state), then `steps` timed steps: tokens per
second (real tokens of the batch, no padding / median step time), and the peak memory of a step above
the state after warm-up (weights, optimizer state, ZeRO buffers) and in total, measured as
in benchmarks.tools.run_case (CUDA: max_memory_allocated over the timed steps; CPU: the resident
set over one more, untimed step with glibc in exact mode). Running out of CUDA memory is a
result, not a crash: {"oom": true, ...} (benchmarks.tools.max_batch searches on it).

`build_train_step` is the step itself, also used by benchmarks.tools.max_batch and
benchmarks.tools.profiler: the trainer's engines and micro-step (prada_fast.engines) on a fixed
random batch.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from benchmarks.tools.run_case import hwm_bytes, measure_cpu_peak


def build_train_step(*, student: str = "tiny", teacher: str = "tiny-teacher", vocab: int = 32000,
                     batch: int = 8, seq: int = 256, loss_impl: str = "auto", ds_config=None,
                     n_domains: int = 4, prompt_len: int = 8, target_frac: float = 0.25,
                     seed: int = 0, min_seq: int | None = None, packing: bool = False):
    """A function step() -> (loss, tokens) running one ZeRO-3 optimizer step of student +
    teacher on a fixed random batch, and a dict describing the set-up. step.for_batch(b)
    gives the same step on a batch of b sequences.

    student / teacher: presets (random weights from their configs) or local model
    directories; vocab > 0 replaces a preset's vocabulary (the byte vocabulary of the tiny
    presets has 259 ids, too few for the loss to matter). The batch: `batch` sequences of
    `seq` tokens (or of random lengths in [min_seq, seq]); a quarter of each sequence is
    the question (no target) and `target_frac` of the sequences are unlabelled
    target-domain rows (domain loss only), as in PRADA. Padded to the longest, or with
    `packing` packed into rows of seq + prompt_len positions (the trainer's --packing).
    The engines and the micro-step are the trainer's (prada_fast.engines), in a world of
    one: one micro-batch per optimizer step, GRL lambda 0.5, temperature 1, alpha 0.5."""
    from prada_fast.common import distributed as dist_util
    from prada_fast.trainer.flags import DEFAULT_DS
    from prada_fast.data import Collator
    from prada_fast.trainer.dsconfig import load_ds_config
    from prada_fast.trainer.engines import build_engines, micro_step
    from prada_fast.models import PRESETS, PradaConfig, PradaModel, check_same_vocab, load_causal_lm
    from prada_fast.teacher.resolve import TeacherSpec
    from prada_fast.trainer.packing import PackedCollator, position_counts

    info = dist_util.setup(10.0)
    cfg = load_ds_config(ds_config or DEFAULT_DS, world_size=info.world_size, device=info.device,
                         max_steps=1000)
    cfg.update(train_batch_size=batch * info.world_size, train_micro_batch_size_per_gpu=batch,
               gradient_accumulation_steps=1)

    def load(name, s):
        overrides = {"vocab_size": vocab} if vocab and name in PRESETS else None
        return load_causal_lm(name, seed=s, config_overrides=overrides)[0]

    torch.manual_seed(seed)
    s_model = load(student, seed)
    V = s_model.get_output_embeddings().weight.shape[0]
    model = PradaModel(s_model, PradaConfig(n_domains, prompt_len, "linear", 0, loss_impl, adversary="grl"))
    t_model = None
    if teacher and teacher != "none":
        t_model = load(teacher, TeacherSpec(seed=seed).init_seed)
        check_same_vocab(s_model, t_model)
    engine, teacher_source = build_engines(model, t_model, cfg)
    dev = engine.device

    def for_batch(b: int):
        """A step() on a fixed random batch of b sequences (same engines: ZeRO-3 does not
        fix the batch size, so a search for the largest batch needs no new process)."""
        g = torch.Generator().manual_seed(seed)
        n_target = int(round(b * target_frac))
        lengths = torch.randint(min_seq or seq, seq + 1, (b,), generator=g).tolist()
        examples = []
        for i, L in enumerate(lengths):
            ids = torch.randint(3, V, (L,), generator=g).tolist()
            labels = [-100] * (L // 4) + ids[L // 4:]      # the question: no target
            if i >= b - n_target:
                labels = [-100] * L                        # unlabelled target-domain sequences
            examples.append({"input_ids": ids, "labels": labels, "domain": i % n_domains})
        collate = PackedCollator(0, prompt_len, seq + prompt_len) if packing else Collator(0)
        mb = {k: v.to(dev) for k, v in collate(examples).items()}
        n_valid = sum(sum(y != -100 for y in ex["labels"][1:]) for ex in examples)
        tokens, padding, positions = position_counts(mb, prompt_len)

        def step():
            loss, _ = micro_step(engine, teacher_source, mb, norm=max(n_valid, 1), lam=0.5,
                                 temperature=1.0, alpha=0.5)
            return float(loss.detach()), tokens

        step.n_valid, step.tokens, step.padding_fraction = n_valid, tokens, padding / positions
        return step

    step = for_batch(batch)
    step.for_batch = for_batch
    n_valid, tokens = step.n_valid, step.tokens

    desc = {"student": student, "teacher": teacher, "vocab": V, "batch": batch, "seq": seq,
            "min_seq": min_seq or seq, "packing": packing,
            "padding_fraction": round(step.padding_fraction, 4), "tokens_per_step": tokens,
            "loss_rows_per_step": n_valid, "loss_impl": loss_impl,
            "device": str(dev), "bf16": bool(cfg.get("bf16", {}).get("enabled")),
            "zero_stage": cfg.get("zero_optimization", {}).get("stage"),
            "student_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            "attn": getattr(s_model.config, "_attn_implementation", None)}
    return step, desc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"))
    p.add_argument("--student", default="tiny")
    p.add_argument("--teacher", default="tiny-teacher")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the presets (0: theirs)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (the longest)")
    p.add_argument("--min-seq", type=int, default=None,
                   help="sequences of random lengths in [min-seq, seq] (default: all seq)")
    p.add_argument("--packing", action="store_true",
                   help="pack the sequences into rows of seq + 8 positions (the trainer's "
                        "--packing) instead of padding them to the longest")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ds", default=None, help="DeepSpeed config (default: ds_configs/zero3.json)")
    p.add_argument("--json", help="write the result here (default: stdout)")
    a = p.parse_args(argv)
    from benchmarks.cases import emit_result

    try:
        res = measure(a)
    except torch.OutOfMemoryError as e:  # CUDA: recorded, not a crash
        res = {"mode": "train_step", "oom": True, "loss_impl": a.loss_impl, "student": a.student,
               "teacher": a.teacher, "batch": a.batch, "seq": a.seq, "error": str(e)[:500]}
    emit_result(res, a.json)
    return 0


def measure(a) -> dict:
    from prada_fast.common import distributed as dist_util
    t_setup = time.perf_counter()
    step, desc = build_train_step(student=a.student, teacher=a.teacher, vocab=a.vocab,
                                  batch=a.batch, seq=a.seq, loss_impl=a.loss_impl, ds_config=a.ds,
                                  min_seq=a.min_seq, packing=a.packing)
    dev = torch.device(desc["device"])
    setup_s = time.perf_counter() - t_setup

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = []

    def timed_steps(n: int) -> list[float]:
        nonlocal tokens
        seconds = []
        for _ in range(n):
            t0 = time.perf_counter()
            loss, tokens = step()
            sync()
            seconds.append(time.perf_counter() - t0)
            losses.append(loss)
        return seconds

    tokens = None
    warm = timed_steps(a.warmup)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = timed_steps(a.steps)
    if dev.type == "cuda":
        peak_total = torch.cuda.max_memory_allocated(dev)
        method = "cuda max_memory_allocated over the timed steps"
    else:  # one more step, untimed, for the memory (glibc in exact mode)
        (loss, tokens), extra, method = measure_cpu_peak(step)
        losses.append(loss)
        peak_total = hwm_bytes()
        base = peak_total - extra
    med = statistics.median(times)
    res = {"mode": "train_step", **desc, "warmup_s": warm, "times_s": times, "median_s": med,
           "tokens_per_s": desc["tokens_per_step"] / med, "losses": losses,
           "peak_extra_bytes": int(peak_total - base), "peak_total_bytes": int(peak_total),
           "mem_baseline_bytes": int(base), "mem_method": method,
           "setup_s": setup_s, "threads": torch.get_num_threads(), "oom": False}
    dist_util.teardown()
    return res


if __name__ == "__main__":
    sys.exit(main())
