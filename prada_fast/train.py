"""PRADA training under DeepSpeed ZeRO-3.

    deepspeed prada_fast/train.py --ds ds_configs/zero3.json [--num_gpus N before the script]
    torchrun --nproc_per_node N prada_fast/train.py ...
    python prada_fast/train.py ...          (one process)

See --help for every flag, and docs/design.md for what a run leaves behind.

The recipe, one function per stage, in the order `main` and `run` call them:

    parse_args       the arguments, every flag checked, the output directory too (trainer/flags.py)
    setup            processes, DeepSpeed config (read, filled, parsed by DeepSpeed)
    load_data        records, domains and their roles, the held-out split (data/prepare.py)
    build_models     student + tokenizer, the encoded data (refused if it cannot teach),
                     the PRADA model, the teacher (teacher/resolve.py; or, --teacher-outputs,
                     its cached outputs, checked against the run: teacher/cache.py)
    evaluate_before  rank 0 claims the output directory, then evaluates the untrained model
    build_engines    DeepSpeed engines of student and teacher (trainer/engines.py), and the
                     batches of each optimizer step (trainer/batching.py), packed rows by
                     default (trainer/packing.py)
    resume           the checkpoint to continue from, if any
    log_sharding     how ZeRO-3 partitioned the student
    train_steps      the optimisation loop (trainer/loop.py; SIGTERM/SIGUSR1: checkpoint, exit 5)
    export           DIR/final: the trained model, gathered from the ZeRO-3 partitions
    evaluate_after   rank 0 evaluates the exported model, reloaded
    summarise        DIR/summary.json and the end-of-run table

Below this file no module reads the argparse namespace: trainer/settings.py turns the
flags into the settings each stage takes.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

if not __package__:  # run as a script (`deepspeed prada_fast/train.py`): this checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prada_fast.trainer import checkpoint
from prada_fast.common import distributed as dist_util
from prada_fast.trainer.batching import StepBatches
from prada_fast.trainer.flags import parse_args, teacher_fit_note
from prada_fast.data import Collator, DataError
from prada_fast.data.prepare import RunData, check_lengths, describe_lengths, encode_all, load_run_data
from prada_fast.trainer.dsconfig import ConfigError, check_with_deepspeed, load_ds_config
from prada_fast.trainer.domain_steps import HeadSteps
from prada_fast.trainer.engines import build_engines
from prada_fast.models.final import export_final
from prada_fast.models import ModelError, PradaConfig, PradaModel, check_same_vocab, load_causal_lm
from prada_fast.models.hub import PRETRAINED_LR, is_pretrained, pretrained_warmup, resolve_args
from prada_fast.trainer.packing import PackedCollator
from prada_fast.trainer.preemption import Preempted
from prada_fast.common.exits import ExitCode
from prada_fast.trainer.report import print_table
from prada_fast.trainer.rundir import RunDir, RunDirError, prepare_output_dir
from prada_fast.common.files import write_jsonl_atomic, write_text_atomic
from prada_fast.trainer import settings
from prada_fast.teacher.cache import TeacherCacheError
from prada_fast.teacher.resolve import resolve_teacher
from prada_fast.trainer.loop import BadNumerics, tensorboard_writer, train_steps


def log(msg: str) -> None:
    if dist_util.rank() == 0:
        print(f"[prada] {msg}", flush=True)


# ----------------------------------------------------------------------------- the recipe
def run(args) -> int:
    """One training run, stage by stage (the module docstring lists them); 0 when done."""
    info, ds_cfg, run_dir = setup(args)
    data = load_data(args)
    model, teacher, tok = build_models(args, data)
    before = evaluate_before(args, run_dir, model, tok, data)
    cached = teacher if args.teacher_outputs else None
    # --domain-steps K >= 1: the head leaves the model before DeepSpeed wraps it (domain_steps.py)
    head_steps = HeadSteps.release(model, args.domain_steps, ds_cfg, args.domain_head_lr_mult, info.device)
    engine, live = build_engines(model, None if cached else teacher, ds_cfg,
                                 head_lr_mult=1.0 if head_steps else args.domain_head_lr_mult,
                                 teacher_memo_bytes=args.teacher_memo_mb << 20)
    if cached:  # the teacher's tensors in the precision DeepSpeed trains the student in
        cached.set_dtype(next(engine.module.parameters()).dtype)
    teacher = cached or live  # a TeacherSource (teacher/interface.py), or None: no KD
    batches = StepBatches(data.train, train_collate(args, data), global_batch=ds_cfg["train_batch_size"],
                          micro_batch=ds_cfg["train_micro_batch_size_per_gpu"],
                          world_size=info.world_size, rank=info.rank, seed=args.seed,
                          tokens_per_batch=args.tokens_per_batch, n_prompt=args.prompt_len)
    start, skipped = resume(args, engine, run_dir, head_steps)
    sharding = log_sharding(engine)
    probe_batches = eval_batches(data.eval, data.collate) if args.probe_every else None
    stats = train_steps(engine, teacher, batches, settings.loop_settings(args), start=start,
                        run=run_dir, ckpt_dir=run_dir.checkpoints, log=log, skipped=skipped,
                        probe_batches=probe_batches, head_steps=head_steps)
    if live is not None and live.memo is not None:
        log(f"teacher: {live.skipped} of {live.skipped + live.forwards} micro-batches read from "
            f"memory ({len(live.memo.rows)} records, {live.memo.bytes / 2**20:.1f} MB"
            + ("; --teacher-memo-mb was full" if live.memo.full else "") + ")")
    if stats["steps"] < args.max_steps:
        log(f"stopped after step {stats['steps']} of {args.max_steps} (--stop-after); "
            "continue with --resume")
        return ExitCode.OK
    export(args, engine, tok, data, run_dir)
    after = evaluate_after(args, run_dir, data)
    summarise(args, run_dir, info, data, stats, sharding, before, after)
    return ExitCode.OK


# ----------------------------------------------------------------------------- the stages
def setup(args):
    """The process group and the DeepSpeed config (the flags, the output directory among
    them, were checked by parse_args: a refused run writes nothing). Returns (dist info,
    config, the run directory)."""
    info = dist_util.setup(args.dist_timeout)
    run_dir = RunDir(Path(args.output_dir))
    lr, warmup = args.lr, None
    if args.lr is None and is_pretrained(args.student):  # models/hub.py: measured defaults
        lr, warmup = PRETRAINED_LR, pretrained_warmup(args.max_steps)
        log(f"pretrained student {args.student}: lr {lr:g}, {warmup} warm-up steps (--lr overrides)")
    note = teacher_fit_note(args)
    if note:
        log(note)
    resolve_args(args, log=log)  # real presets -> their directories (rank 0 gets them once)
    ds_cfg = load_ds_config(args.ds, world_size=info.world_size, device=info.device,
                            max_steps=args.max_steps, lr=lr, warmup_steps=warmup,
                            one_rank_zero=args.one_rank_zero, log=log)
    check_with_deepspeed(ds_cfg, args.ds)
    dist_util.register_pid()
    torch.manual_seed(args.seed)
    return info, ds_cfg, run_dir


def load_data(args) -> RunData:
    """The records, their domains and roles, and the held-out split."""
    data = load_run_data(settings.data_settings(args))
    log(f"data: {data.describe()}")
    return data


def build_models(args, data: RunData):
    """The student and its tokenizer, the data encoded with it (filled into `data`), the
    PRADA model around the student, and the teacher (None without KD). Returns
    (model, teacher, tokenizer)."""
    student, tok = load_causal_lm(args.student, attn=args.attn, seed=args.seed)
    domain_ids = {d: i for i, d in enumerate(data.domains)}
    data.train, data.lengths = encode_all(data.train_records, tok, args.max_len, domain_ids)
    data.truncated = data.lengths["truncated"]
    log(describe_lengths(data.lengths))
    warning = check_lengths(data.lengths, args.on_long)  # data that cannot teach: DataError
    if warning:
        log(warning)
    data.eval, _ = encode_all(data.eval_records, tok, args.max_len, domain_ids)
    data.collate = Collator(tok.pad_token_id)
    model = PradaModel(student, PradaConfig(
        n_domains=len(data.domains), n_prompt=args.prompt_len, head=args.domain_head,
        mlp_hidden=args.mlp_hidden, loss_impl=args.loss_impl, pool=args.pool, adversary=args.adversary,
        prompt_encoder=args.prompt_encoder, prompt_hidden=args.prompt_hidden, pool_layer=args.pool_layer,
        prompt_init=args.prompt_init))
    if args.teacher_outputs:  # no teacher model: its outputs, read per micro-batch
        return model, open_teacher_outputs(args, tok, data, student), tok
    teacher = resolve_teacher(settings.teacher_spec(args), args.student, tok, data.train, data.collate,
                              attn=args.attn, show_progress=not args.no_progress, log=log)
    if teacher is not None:
        check_same_vocab(student, teacher)
    return model, teacher, tok


def open_teacher_outputs(args, tok, data: RunData, student):
    """The --teacher-outputs cache, checked against this run (teacher_cache.open_for_run:
    TeacherCacheError names the field that does not match) and against the student's
    vocabulary."""
    from prada_fast.teacher.cache import open_for_run
    outputs = open_for_run(args.teacher_outputs, tok, data.train, max_len=args.max_len,
                           temperature=args.temperature, teacher=settings.teacher_spec(args),
                           data=settings.data_settings(args))
    m = outputs.manifest
    if m["vocab_size"] != student.get_output_embeddings().weight.shape[0]:
        raise TeacherCacheError(f"--teacher-outputs {args.teacher_outputs}: field \"vocab_size\": "
                                f"the cache has {m['vocab_size']}, the student "
                                f"{student.get_output_embeddings().weight.shape[0]}")
    log(f"teacher: outputs cached in {args.teacher_outputs} ({m['mode']}"
        + (f", K={m['k']}, tau={m['temperature']}" if m["mode"] == "topk" else f", {m['dtype']}")
        + f", {m['records']['count']} examples); no teacher model is built")
    return outputs


def train_collate(args, data: RunData):
    """The training micro-batches' collator: packed rows with --packing (rows as wide as a
    full-length padded example, --max-len + --prompt-len), else padded."""
    if not args.packing:
        return data.collate
    return PackedCollator(data.collate.pad_id, args.prompt_len, args.max_len + args.prompt_len)


def evaluate_before(args, run_dir: RunDir, model, tok, data: RunData):
    """Rank 0: the inputs are valid, so the run claims the output directory (run config,
    ranks.json), then evaluates the untrained model on the held-out records; the other
    ranks wait. Returns (answer accuracy by domain, domain accuracy), (None, None) off
    rank 0 or without held-out records."""
    acc = dom = None
    if dist_util.rank() == 0:
        prepare_output_dir(run_dir.root, resume=args.resume, overwrite=args.overwrite,
                           run_config=settings.run_config(args))
        run_dir.ranks.write_text(json.dumps(dist_util.rank_pids()) + "\n")
        if data.eval_records:
            log("evaluating before training ...")
            acc, dom = evaluate(model, tok, data.eval_records, data.eval, data.collate, args,
                                generations=run_dir.generations("before"))
    dist_util.wait_for_rank0("before-eval", (acc, dom))
    return acc, dom


def resume(args, engine, run_dir: RunDir, head_steps=None):
    """(first step, steps skipped so far): from the latest usable checkpoint with --resume
    (a truncated or incomplete one is named and the previous one used), else (0, 0). On
    rank 0 the metrics of steps after the checkpoint are dropped (recomputed). head_steps
    (--domain-steps): its head and optimizer come back from this rank's file too."""
    start, ckpt_dir = 0, run_dir.checkpoints
    tag, client = checkpoint.load(engine, ckpt_dir, log=log, rank_state=head_steps is not None) \
        if args.resume else (None, None)
    if client is not None:
        start = int(client["step"])
        if head_steps is not None:
            head_steps.load_state_dict(client["rank_state"]["domain_head"])
        log(f"resumed from {ckpt_dir / tag} at step {start}")
    elif args.resume:
        log(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0")
    if dist_util.rank() == 0:
        trim_metrics(run_dir.metrics, start)
    return start, int((client or {}).get("skipped_steps", 0))


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the metrics of steps after the checkpoint: they are recomputed."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def log_sharding(engine) -> dict:
    """How ZeRO partitioned the student, and at which stage (logged, and kept for the summary)."""
    sharding = {"stage": engine.zero_optimization_stage(),
                **dist_util.zero3_partition_stats(engine.module)}
    log(f"ZeRO stage {sharding['stage']}: rank 0 holds {sharding['local_numel'][0]:,} of "
        f"{sharding['full_numel']:,} parameter elements ({sharding['partitioned_tensors']} of "
        f"{sharding['tensors']} tensors partitioned)")
    return sharding


def export(args, engine, tok, data: RunData, run_dir: RunDir) -> None:
    """DIR/final: the student as a Hugging Face model plus soft prompt and domain head."""
    export_final(engine.module, tok, run_dir.final, {"domains": data.domains, "roles": data.roles},
                 rank0=dist_util.rank() == 0)


def evaluate_after(args, run_dir: RunDir, data: RunData):
    """Rank 0: the exported model, reloaded from DIR/final, on the held-out records.
    Returns (answer accuracy by domain, domain accuracy), or (None, None)."""
    if dist_util.rank() != 0 or not data.eval_records:
        return None, None
    log("evaluating the saved model ...")
    final_model, final_tok, _ = PradaModel.from_final(run_dir.final, attn=args.attn)
    return evaluate(final_model, final_tok, data.eval_records, data.eval, data.collate, args,
                    generations=run_dir.generations("after"))


def eval_batches(eval_examples, collate, size: int = 64) -> list:
    """The held-out examples, collated in batches of `size` (the domain probes' input)."""
    return [collate(eval_examples[i:i + size]) for i in range(0, len(eval_examples), size)]


def evaluate(model, tok, eval_records, eval_examples, collate, args, generations: Path):
    """(answer accuracy by domain, domain alignment: the head's and a fresh probe's accuracy
    on the pooled features, evaluation.domain_alignment) on the held-out records; every
    record's question, gold answer, generated text, answer read and grade go to
    `generations` (one JSON line each)."""
    from prada_fast.trainer.evaluation import accuracy_by_domain, answer_rows, domain_alignment
    with dist_util.all_threads():
        rows = answer_rows(model, tok, eval_records, max_new_tokens=args.max_new_tokens,
                           batch_size=args.eval_batch_size)
        write_jsonl_atomic(generations, rows)
        acc = {d: v["accuracy"] for d, v in accuracy_by_domain(rows).items()}
        align = domain_alignment(model, eval_batches(eval_examples, collate), layers=args.layer_probes)
    return acc, align


def summarise(args, run_dir: RunDir, info, data: RunData, stats: dict, sharding: dict, before, after) -> None:
    """Rank 0: DIR/summary.json and the end-of-run table, with a warning when the student
    fools its domain head rather than aligning the domains."""
    from prada_fast.trainer.evaluation import FOOLED_ADVICE, FOOLED_P, fooled
    if dist_util.rank() != 0:
        return
    (acc_before, align_before), (acc_after, align_after) = before, after
    domains = {d: {"role": data.roles[d], "accuracy_before": (acc_before or {}).get(d),
                   "accuracy_after": (acc_after or {}).get(d)} for d in data.domains}
    alignment = None
    if align_after is not None:
        final_dom = None if args.no_domain_loss else stats["final_parts"].get("dom")
        alignment = {**align_after, "final_dom_loss": final_dom,
                     "probe_accuracy_before": align_before["probe_accuracy"],
                     "layer_probe_accuracy_before": align_before.get("layer_probe_accuracy"),
                     "fooled": fooled(align_after, final_dom)}
    summary = {"steps": stats["steps"], "tokens_per_s": stats["tokens_per_s"],
               "real_tokens": stats["real_tokens"], "padding_fraction": stats["padding_fraction"],
               "final_loss": stats["final_loss"],
               "domain_classifier_accuracy": (align_after or {}).get("head_accuracy"),
               "domain_probe_accuracy": (align_after or {}).get("probe_accuracy"),
               "domain_alignment": alignment,
               "domains": domains, "truncated_sequences": data.truncated, "lengths": data.lengths,
               "steps_without_labels": sum('"no_labels": true' in line for line in
                                           run_dir.metrics.read_text().splitlines()),
               "skipped_records": data.skipped, "skipped_steps": stats["skipped_steps"],
               "world_size": info.world_size, "zero3": sharding,
               "wall_seconds": round(time.time() - info.start_time, 1),
               "domain_classifier_accuracy_before": (align_before or {}).get("head_accuracy")}
    write_text_atomic(run_dir.summary, json.dumps(summary, indent=2) + "\n")
    board = tensorboard_writer(args.report_to == "tensorboard", run_dir)
    if board:
        for d, v in domains.items():
            if v["accuracy_after"] is not None:
                board.add_scalar(f"eval/accuracy/{d}", v["accuracy_after"], stats["steps"])
        for key in ("head_accuracy", "probe_accuracy"):
            if (alignment or {}).get(key) is not None:
                board.add_scalar(f"eval/domain_{key}", alignment[key], stats["steps"])
        board.close()
    print_table(summary)
    if alignment and alignment["fooled"]:
        probe = alignment["probe_accuracy"]
        log(f"warning: the student fools the domain head instead of hiding the domain: head "
            f"accuracy {alignment['head_accuracy']:.3f} on {alignment['records']} held-out records is "
            f"below chance {alignment['chance']:.3f} beyond noise (binomial p < {FOOLED_P}) with "
            f"L_dom {final_dom:.3f} > ln D = {alignment['ln_domains']:.3f}"
            + (f", and a fresh probe still tells the domains apart at {probe:.2f}" if probe is not None
               else "") + f". {FOOLED_ADVICE[args.adversary]}")


def resume_command(argv: list[str]) -> str:
    """The trainer's arguments to continue this run: --resume instead of --overwrite."""
    keep = [a for a in argv if a != "--overwrite" and not a.startswith(("--local_rank", "--local-rank"))]
    return shlex.join(["prada_fast/train.py", *keep, *([] if "--resume" in keep else ["--resume"])])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # torch.distributed deprecation notices that DeepSpeed triggers on every step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag (2, its one line printed)
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    code = ExitCode.OK
    try:
        code = run(args)
    except (DataError, ModelError, ConfigError, RunDirError, checkpoint.CheckpointError,
            TeacherCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = ExitCode.BAD_INPUT
    except BadNumerics as e:
        print(f"error: {e}", file=sys.stderr)
        code = ExitCode.BAD_NUMERICS
    except dist_util.RankFailure as e:
        print(f"error: rank {dist_util.rank()}: {e}", file=sys.stderr)
        code = ExitCode.RANK_FAILED
    except Preempted as e:
        if dist_util.rank() == 0:
            print(f"preempted ({e.reason}): stopped after step {e.step} of {e.max_steps}, checkpoint "
                  f"{e.checkpoint}. Continue with the same launcher and: {resume_command(argv)}",
                  file=sys.stderr, flush=True)
        code = ExitCode.PREEMPTED
    except checkpoint.CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        code = ExitCode.SAVE_FAILED
    finally:
        dist_util.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
