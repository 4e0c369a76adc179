"""Answer accuracy of any model on any data, per domain.

    python -m prada_fast.evaluate --model DIR|PRESET --data SPEC [--data SPEC ...]
    python -m prada_fast.evaluate --held-out-of runs/prada     (a run's final/ on its held-out records)
    torchrun --nproc_per_node N -m prada_fast.evaluate ...     (batches split over ranks)

The model: a preset, a local causal LM directory, or a run's final/ (it holds
prada_config.json) with its soft prompt applied. The data: the trainer's --data grammar,
each spec whole or its first N (`#N`); records without a gold answer are left out. Or
--held-out-of RUN_DIR: the records that run held out, rebuilt from its run_config.json as
the trainer chose them.

Each batch of --eval-batch-size prompts is decoded greedily with the KV cache
(models.generation.greedy_texts) and each answer read and checked by the evaluation's own
checker (data.format.grade), as the trainer's end-of-run evaluation does: on a run's final/
and its held-out records with the run's --max-new-tokens and --eval-batch-size, the table
is the run's "acc after". The prompt (--prompt): the trainer's "Q: ...\\nA:" for a model
prada_fast trained or fitted, else zero-shot chain of thought in the tokenizer's chat
template, with a second, greedy step asking for the answer when a text states none.

Under a launcher the batches (the same whatever the number of ranks) are dealt to the ranks
in turn; rank 0 gathers the answers, prints the table and writes --out (JSON) and
--save-generations (JSON lines), each atomically. Bad input: one `error:` line, exit 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from prada_fast.common import distributed as dist_util
from prada_fast.common.exits import ExitCode, run_command
from prada_fast.common.files import write_json_atomic, write_jsonl_atomic
from prada_fast.common.flags import (FlagError, FlagParser, add_data_flags, add_generation_flags,
                                     add_model_flags, add_run_flags, check_data_flags, flag,
                                     generation_timeout)
from prada_fast.data import DataError
from prada_fast.models import PRESETS, ModelError
from prada_fast.models.hub import real_preset_help

DESCRIPTION = ("Per-domain answer accuracy of a model (a preset, a local causal LM directory, or a "
               "run's final/ with its soft prompt) on --data or on a run's held-out records: "
               "batched greedy decoding, the evaluation's answer checker, a table, --out JSON. "
               "Under torchrun or the deepspeed launcher the batches are split over the ranks.")


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m prada_fast.evaluate", description=DESCRIPTION)
    p.add_argument("--model", metavar="DIR|PRESET",
                   help=f"the model: a real pretrained preset ({real_preset_help()}: got and "
                        "converted on first use, see `python -m prada_fast.models --help`), a preset "
                        f"({', '.join(PRESETS)}: random weights, seeded by --seed), a local Hugging "
                        "Face causal LM directory, or a run's final/ "
                        "directory (it holds prada_config.json: the student with its soft prompt). "
                        "Default with --held-out-of: RUN_DIR/final")
    add_data_flags(p, None, ("data",), data=dict(
        help="records with gold answers, repeatable: the trainer's --data grammar "
             "(synthetic[:N[:dom,..]], gsm8k*.jsonl, aqua*.json, strategyqa*.json, "
             "jsonl:PATH?question={Body} {Question}&answer=Answer&domain=svamp, ...); '#N' keeps "
             "the first N records of a spec; records without an answer are left out"))
    p.add_argument("--held-out-of", metavar="RUN_DIR",
                   help="instead of --data: the records that training run held out (rebuilt from "
                        "its run_config.json, as the trainer chose them); its --max-new-tokens and "
                        "--eval-batch-size too, unless given: the run's own table")
    p.add_argument("--out", metavar="FILE.json",
                   help="write the accuracies (per domain and overall, with the settings) as JSON")
    p.add_argument("--save-generations", metavar="FILE.jsonl",
                   help="write one JSON line per record: question, gold, generated text, the "
                        "extracted answer (predicted), correct, domain")
    add_generation_flags(p, None, ("max_new_tokens", "eval_batch_size", "prompt", "prompt_template"))
    add_generation_flags(p, None, ("answer_tokens",), answer_tokens=dict(
        help="tokens of the answer-extraction step: with a chain-of-thought prompt (cot, a "
             "template), a text that states no answer gets a second, greedy step that asks for it"))
    add_model_flags(p, None, ("attn",))
    add_run_flags(p, None, ("seed",), seed=dict(
        help="seed of a preset's random weights and of synthetic data"))
    add_data_flags(p, None, ("skip_bad",))
    add_run_flags(p, None, ("no_progress", "dist_timeout", "local_rank"),
                  dist_timeout=generation_timeout("batches"))
    return p


RUN_SETTINGS = ("max_new_tokens", "eval_batch_size")  # taken from --held-out-of's run unless given


def validate(parser, args, typed: tuple[str, ...] = ()) -> None:
    """Every flag checked before any work: the data or the run, the model, the outputs.
    With --held-out-of, the run's RUN_SETTINGS stand for the flags not `typed`."""
    from prada_fast.models.final import check_model
    from prada_fast.trainer.rundir import RunDir
    if bool(args.data) == bool(args.held_out_of):
        raise FlagError("give --data (repeatable) or --held-out-of RUN_DIR, one of them")
    if args.data:
        check_data_flags(parser, args)
    else:
        run = RunDir(Path(args.held_out_of))
        if not run.run_config.is_file():
            raise FlagError(f"--held-out-of {args.held_out_of}: no {run.run_config.name} (not a "
                            "training run's output directory)")
        args.model = args.model or str(run.final)
        config = json.loads(run.run_config.read_text())
        for dest in RUN_SETTINGS:
            if flag(parser, dest) not in typed and dest in config:
                setattr(args, dest, config[dest])
    if not args.model:
        raise FlagError("--model is required (a preset, a model directory or a run's final/)")
    try:
        check_model(args.model)
    except ModelError as e:
        raise FlagError(f"--model: {e}") from None
    for dest, name in (("out", "--out"), ("save_generations", "--save-generations")):
        path = getattr(args, dest)
        if path and Path(path).is_dir():
            raise FlagError(f"{name} {path}: a directory, not a file")
    if args.prompt_template and not Path(args.prompt_template).is_file():
        raise FlagError(f"--prompt-template {args.prompt_template}: no such file")


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    typed = tuple(a.split("=", 1)[0] for a in argv if a.startswith("--"))
    return parser.parse_flags(argv, lambda args: validate(parser, args, typed))


def load_records(args):
    """(records, a line saying what they are)."""
    if args.held_out_of:
        from prada_fast.trainer.rundir import RunDir
        from prada_fast.trainer.settings import held_out_records
        records, _, _ = held_out_records(json.loads(RunDir(Path(args.held_out_of)).run_config.read_text()),
                                          where=args.held_out_of)
        if not records:
            raise DataError(f"--held-out-of {args.held_out_of}: the run held out no records "
                            "(--eval-per-domain 0)")
        return records, f"{len(records)} held-out records of {args.held_out_of}"
    from prada_fast.data.prepare import load_answered
    records, skipped, unanswered = load_answered(args.data, skip_bad=args.skip_bad, seed=args.seed)
    notes = [f"{skipped} bad records skipped"] if skipped else []
    notes += [f"{unanswered} without a gold answer left out"] if unanswered else []
    return records, f"{len(records)} records" + (f" ({'; '.join(notes)})" if notes else "")


def evaluate(args) -> int:
    """Load, decode this rank's batches, gather on rank 0, report."""
    import torch
    from tqdm.auto import tqdm

    from prada_fast.models.final import load_any
    from prada_fast.models.hub import resolve_args
    from prada_fast.teacher.rationales.generators import make_prompter
    from prada_fast.trainer.evaluation import accuracy_by_domain, answer_batch
    from prada_fast.trainer.report import print_accuracy_table
    start = time.time()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    info = dist_util.setup(args.dist_timeout) if launched else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    try:
        records, what = load_records(args)
        # a real preset -> its directory (rank 0 gets and converts it once, the others wait)
        resolve_args(args, ("model",), log=lambda m: print(f"[evaluate] {m}", flush=True))
        model, tok, final_meta = load_any(args.model, attn=args.attn, seed=args.seed)
        device = info.device if info else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        prompter = make_prompter(args.prompt, args.prompt_template, args.model, tok)
        chat = prompter.kind == "cot" and prompter.chat is not None
        if rank == 0:
            print(f"[evaluate] {what}; model {args.model}" + (" (a run's final/)" if final_meta else "")
                  + f"; prompt {prompter.kind}" + (" in the chat template" if chat else "")
                  + f"; {world} rank(s)", flush=True)
        n = args.eval_batch_size
        batches = [(s, records[s:s + n]) for s in range(0, len(records), n)]
        mine = batches[rank::world]
        bar = tqdm(total=sum(len(b) for _, b in mine), desc=f"evaluate (rank {rank})", unit="record",
                   disable=args.no_progress, dynamic_ncols=True, position=rank)
        rows = []
        # one process: every core (as the trainer's evaluation); ranks: setup shared the cores
        with contextlib.nullcontext() if launched else dist_util.all_threads():
            for s, batch in mine:
                answers = answer_batch(model, tok, batch, max_new_tokens=args.max_new_tokens,
                                       prompter=None if prompter.kind == "prada" else prompter,
                                       answer_tokens=args.answer_tokens)
                rows += [(s + i, row) for i, row in enumerate(answers)]
                bar.update(len(batch))
        bar.close()
        gathered = dist_util.gather_objects(rows)
        if rank == 0:
            rows = [row for _, row in sorted(r for part in gathered for r in part)]
            report = {"model": args.model, "final": final_meta is not None, "prompt": prompter.kind,
                      "chat_template": chat, "data": args.data, "held_out_of": args.held_out_of,
                      "max_new_tokens": args.max_new_tokens, "eval_batch_size": args.eval_batch_size,
                      "answer_tokens": args.answer_tokens if prompter.kind != "prada" else None,
                      "ranks": world, **totals(rows), "domains": accuracy_by_domain(rows),
                      "seconds": round(time.time() - start, 1)}
            print_accuracy_table(report)
            write_outputs(args, report, rows)
        dist_util.barrier()
    finally:
        if launched:
            dist_util.teardown()
    return ExitCode.OK


def totals(rows: list[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    return {"records": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}


def write_outputs(args, report: dict, rows: list[dict]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
        print(f"[evaluate] wrote {args.out}", flush=True)
    if args.save_generations:
        Path(args.save_generations).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(args.save_generations, rows)
        print(f"[evaluate] wrote {args.save_generations}", flush=True)


def main(argv=None) -> int:
    from prada_fast.teacher.rationales.generators import RationaleError
    return run_command(lambda: parse_args(argv), evaluate, (DataError, ModelError, RationaleError))


if __name__ == "__main__":
    sys.exit(main())
