"""PRADA training under DeepSpeed ZeRO-3.

    deepspeed prada_fast/train.py --ds ds_configs/zero3.json [--num_gpus N before the script]
    torchrun --nproc_per_node N prada_fast/train.py ...
    python prada_fast/train.py ...          (one process)

See --help for every flag, and DESIGN.md for what a run leaves behind.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts this folder first on sys.path, where our module names could
# shadow installed packages: import the installed `prada_fast` instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import json
import os
import time
import warnings

import torch

# torch.distributed deprecation notices that DeepSpeed triggers on every step
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from prada_fast import checkpoint
from prada_fast import distributed as dist_util
from prada_fast.batching import StepBatches
from prada_fast.cli import parse_args
from prada_fast.data import Collator, DataError
from prada_fast.data.prepare import encode_all, hold_out, load_records
from prada_fast.export import export_final
from prada_fast.dsconfig import ConfigError, inference_config, load_ds_config
from prada_fast.model import PRESETS, ModelError, PradaModel, check_same_vocab, load_causal_lm
from prada_fast.report import RunDirError, check_output_dir, prepare_output_dir, print_table
from prada_fast.teacher import default_cache_dir, fit_teacher
from prada_fast.trainloop import BadNumerics, train_steps

def log(msg: str) -> None:
    if dist_util.rank() == 0:
        print(f"[prada] {msg}", flush=True)


def resolve_teacher(args, tok, train_examples, collate):
    """A local path / preset, or None; 'auto' fits the tiny teacher for a preset student."""
    choice = args.teacher
    if choice == "none":
        return None
    if choice == "auto":
        if args.student not in PRESETS:
            log("no --teacher given for a non-preset student: training without KD")
            return None
        cache = Path(args.teacher_cache) if args.teacher_cache else default_cache_dir()
        path = None
        if dist_util.rank() == 0:
            with dist_util.all_threads():
                path = fit_teacher("tiny-teacher", tok, train_examples, collate,
                                   steps=args.teacher_steps, lr=args.teacher_lr, batch=32,
                                   seed=args.seed, cache_dir=cache,
                                   show_progress=not args.no_progress, log=log)
        choice = str(dist_util.wait_for_rank0("teacher", path))
    teacher, _ = load_causal_lm(choice, tokenizer=tok, attn=args.attn, seed=args.seed + 7)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def evaluate(model, tok, eval_records, eval_examples, collate, args):
    from prada_fast.evaluation import answer_accuracy, domain_accuracy
    with dist_util.all_threads():
        acc = answer_accuracy(model, tok, eval_records, max_new_tokens=args.max_new_tokens,
                              batch_size=args.eval_batch_size)
        batches = [collate(eval_examples[i:i + 64]) for i in range(0, len(eval_examples), 64)]
        dom = domain_accuracy(model, batches)
    return acc, dom


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the metrics of steps after the checkpoint: they are recomputed."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def run(args) -> int:
    import deepspeed
    info = dist_util.setup(args.dist_timeout)
    world, rank = info.world_size, info.rank
    out = Path(args.output_dir)
    ds_cfg = load_ds_config(args.ds, world_size=world, device=info.device,
                            max_steps=args.max_steps, lr=args.lr)
    check_output_dir(out, args)  # every rank, before any work: a refused run writes nothing
    dist_util.register_pid()
    torch.manual_seed(args.seed)

    # data
    records, skipped = load_records(args)
    domains = sorted({r.domain for r in records})
    roles = {d: "target" if any(r.domain == d and not r.labelled for r in records) else "source"
             for d in domains}
    train_recs, eval_recs = hold_out(records, args.eval_per_domain, args.seed)
    log(f"data: {len(train_recs)} training / {len(eval_recs)} held-out records; domains "
        + ", ".join(f"{d} ({roles[d]})" for d in domains)
        + (f"; {skipped} bad records skipped" if skipped else ""))

    # models
    student, tok = load_causal_lm(args.student, attn=args.attn, seed=args.seed)
    domain_ids = {d: i for i, d in enumerate(domains)}
    train_ex, n_trunc = encode_all(train_recs, tok, args, domain_ids)
    eval_ex, _ = encode_all(eval_recs, tok, args, domain_ids)
    collate = Collator(tok.pad_token_id)
    model = PradaModel(student, len(domains), args.prompt_len, args.domain_head,
                       args.mlp_hidden, args.loss_impl)
    teacher = resolve_teacher(args, tok, train_ex, collate)
    if teacher is not None:
        check_same_vocab(student, teacher)

    acc_before = dom_before = None
    if rank == 0:
        prepare_output_dir(out, args)  # inputs are valid: now the run may claim the directory
        (out / "ranks.json").write_text(json.dumps(dist_util.rank_pids()) + "\n")
        if eval_recs:
            log("evaluating before training ...")
            acc_before, dom_before = evaluate(model, tok, eval_recs, eval_ex, collate, args)
    dist_util.wait_for_rank0("before-eval", (acc_before, dom_before))

    # engines: the student trains, the teacher is sharded the same way with no optimizer
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg)
    t_engine = None
    if teacher is not None:
        t_engine, *_ = deepspeed.initialize(model=teacher, config=inference_config(ds_cfg))
        t_engine.eval()
    batches = StepBatches(train_ex, collate, global_batch=ds_cfg["train_batch_size"],
                          micro_batch=ds_cfg["train_micro_batch_size_per_gpu"],
                          world_size=world, rank=rank, seed=args.seed)

    ckpt_dir = out / "checkpoints"
    start = 0
    client = checkpoint.load(engine, ckpt_dir) if args.resume else None
    if client is not None:
        start = int(client["step"])
        log(f"resumed from {ckpt_dir / checkpoint.latest_tag(ckpt_dir)} at step {start}")
    elif args.resume:
        log(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")
    sharding = dist_util.zero3_partition_stats(engine.module)
    log(f"ZeRO-3: rank 0 holds {sharding['local_numel'][0]:,} of {sharding['full_numel']:,} "
        f"parameter elements ({sharding['partitioned_tensors']} of {sharding['tensors']} "
        "tensors partitioned)")

    if rank == 0:
        trim_metrics(out / "metrics.jsonl", start)
    stats = train_steps(engine, t_engine, batches, args, start=start, out=out,
                        ckpt_dir=ckpt_dir, log=log, skipped=int((client or {}).get("skipped_steps", 0)))
    if stats["steps"] < args.max_steps:
        log(f"stopped after step {stats['steps']} of {args.max_steps} (--stop-after); "
            "continue with --resume")
        return 0

    meta = {"domains": domains, "roles": roles, "n_prompt": args.prompt_len,
            "domain_head": args.domain_head, "mlp_hidden": args.mlp_hidden}
    export_final(engine.module, tok, out / "final", meta)

    summary = {"steps": stats["steps"], "tokens_per_s": stats["tokens_per_s"],
               "final_loss": stats["final_loss"], "domain_classifier_accuracy": None,
               "domains": {}, "truncated_sequences": n_trunc, "skipped_records": skipped,
               "skipped_steps": stats["skipped_steps"],
               "world_size": world, "zero3": sharding, "wall_seconds": None}
    if rank == 0:
        acc_after = dom_after = None
        if eval_recs:
            log("evaluating the saved model ...")
            final_model, final_tok, _ = PradaModel.from_final(out / "final", attn=args.attn)
            acc_after, dom_after = evaluate(final_model, final_tok, eval_recs, eval_ex, collate, args)
        summary["domain_classifier_accuracy"] = dom_after
        summary["domain_classifier_accuracy_before"] = dom_before
        for d in domains:
            summary["domains"][d] = {
                "role": roles[d],
                "accuracy_before": (acc_before or {}).get(d),
                "accuracy_after": (acc_after or {}).get(d)}
        summary["wall_seconds"] = round(time.time() - info.start_time, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_table(summary)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    code = 0
    try:
        code = run(args)
    except (DataError, ModelError, ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BadNumerics as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    except dist_util.RankFailure as e:
        print(f"error: rank {dist_util.rank()}: {e}", file=sys.stderr)
        code = 4
    finally:
        dist_util.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
