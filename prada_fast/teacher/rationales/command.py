"""The command `python -m prada_fast.rationales`: its flags, and the run over the ranks
(each rank samples its share of the batches into its part file; rank 0 merges)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from prada_fast.common import distributed as dist_util
from prada_fast.common.exits import ExitCode, run_command
from prada_fast.common.flags import (
    FlagError,
    FlagParser,
    add_data_flags,
    add_generation_flags,
    add_model_flags,
    add_run_flags,
    generation_timeout,
    at_least,
    check_data_flags,
    deprecated,
    within,
)
from prada_fast.data import DataError
from prada_fast.models import PRESETS, ModelError
from prada_fast.models.hub import parse_real, real_preset_help, resolve_args

from .generators import RationaleError, build_generator, gen_tokenizer, make_prompter
from .partial import check_settings, merge, read_partial, settings_of
from .questions import load_questions, make_batches, run_batch


def generate_all(args) -> int:
    """Every question's samples, judged, into --out (see the package's docstring)."""
    out = Path(args.out)
    part_dir = out.with_name(out.name + ".partial")
    info = dist_util.setup(args.dist_timeout)
    try:
        if out.exists() and not args.overwrite:
            raise RationaleError(f"--out {out} exists: pass --overwrite to replace it")
        resolve_args(args, ("teacher",), log=lambda m: print(f"[rationales] {m}", flush=True))
        questions = load_questions(args.data, args.skip_bad, args.seed)
        # every rank checks: a refusal stops them all
        check_settings(part_dir, settings_of(args, len(questions)), info.rank)
        dist_util.barrier()
        done = read_partial(part_dir)
        batches = make_batches(questions, max(1, args.batch_size // args.samples))
        mine = [(j, b) for j, b in enumerate(batches) if j % info.world_size == info.rank]
        if info.rank == 0:
            resumed = f"; {len(done)} questions already done (resumed)" if done else ""
            print(f"[rationales] {len(questions)} questions, {args.samples} samples each, "
                  f"{len(batches)} batches over {info.world_size} rank(s){resumed}", flush=True)
        sample_share(args, info, mine, done, part_dir)
        dist_util.barrier()
        if info.rank == 0:
            merge(out, part_dir, questions, args)
        dist_util.barrier()
    finally:
        dist_util.teardown()
    return ExitCode.OK


def sample_share(args, info, mine: list, done: dict, part_dir: Path) -> None:
    """This rank's batches (`mine`, (number, batch) pairs) that are not done, one line per
    finished question appended to its part file, flushed and synced."""
    todo = [(j, b) for j, b in mine if any(q.index not in done for q in b)]
    if not todo:
        return
    gen = build_generator(args, info.device)
    prompter = make_prompter(args.prompt, args.prompt_template, args.teacher, gen_tokenizer(gen))
    part = part_dir / f"rank{info.rank}.jsonl"
    total = sum(len(b) for _, b in mine)
    bar = tqdm(total=total, initial=total - sum(len(b) for _, b in todo),
               desc=f"rationales (rank {info.rank})", unit="question",
               disable=args.no_progress, dynamic_ncols=True, position=info.rank)
    with part.open("a", encoding="utf-8") as fh:
        if fh.tell() and not part.read_bytes().endswith(b"\n"):
            fh.write("\n")  # after a line torn by a crash: start a fresh one
        for j, batch in todo:
            rows = run_batch(gen, prompter, batch, args, seed=args.seed * 1_000_003 + j)
            for row in rows:
                if row["index"] in done:
                    continue
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            bar.update(len(batch))
    bar.close()


RANGES = {"samples": at_least(1), "sample_temperature": at_least(0), "top_p": within(0, 1, open_low=True),
          "batch_size": at_least(1)}


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="python -m prada_fast.rationales",
        description="Sample chain-of-thought rationales from a teacher for every question of "
                    "--data, keep those whose answer matches the gold one, and write them as JSON "
                    "lines that the trainer's --data reads. Under torchrun or the deepspeed "
                    "launcher the questions are split over the ranks.",
        ranges=RANGES)
    add_model_flags(p, None, ("teacher",), teacher=dict(
        required=True, default=None, metavar="DIR|PRESET",
        help=f"a local Hugging Face model directory, a real pretrained preset ({real_preset_help()}: "
             "got and converted on first use, see `python -m prada_fast.models --help`), or a "
             f"preset ({', '.join(PRESETS)}: random weights, for tests); required: there is no "
             "auto teacher to sample from"))
    add_data_flags(p, None, ("data",), data=dict(
        required=True,
        help="questions with gold answers, repeatable: the trainer's --data grammar "
             "(synthetic[:N[:dom,..]], gsm8k*.jsonl, jsonl:PATH?question={Body} "
             "{Question}&answer=Answer&domain=svamp, ...); rationale columns are not needed"))
    p.add_argument("--out", required=True, metavar="FILE.jsonl",
                   help="the kept rationales; FILE.summary.json gets the per-domain summary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--samples", type=int, default=4, metavar="K", help="rationales sampled per question")
    p.add_argument("--sample-temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature (0: greedy, one distinct sample); not the trainer's "
                        "--temperature, the distillation temperature")
    deprecated(p, None, "--temperature", "sample_temperature", type=float, metavar="T")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    add_generation_flags(p, None, ("max_new_tokens",), max_new_tokens=dict(
        default=128, help="tokens per rationale (more than the evaluation's answers: a rationale "
                          "is longer)"))
    add_generation_flags(p, None, ("answer_tokens",))
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per generate call (questions per batch: this / --samples)")
    add_generation_flags(p, None, ("prompt", "prompt_template"))
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="hf: transformers' generate; vllm: vLLM's offline engine (needs vllm and "
                        "a GPU); auto: vllm when both are there and the teacher is a directory")
    add_run_flags(p, None, ("seed",), seed=dict(help="seed of sampling and of synthetic data"))
    add_data_flags(p, None, ("skip_bad",))
    add_run_flags(p, None, ("no_progress", "dist_timeout", "local_rank"),
                  dist_timeout=generation_timeout("questions"))
    return p


def validate(parser, args) -> None:
    """Paths and combinations (the ranges are checked before, from the parser)."""
    if not args.out.endswith(".jsonl"):
        raise FlagError("--out must name a .jsonl file")
    try:
        real = parse_real(args.teacher)  # a real preset: got on first use (a bad K raises)
    except ModelError as e:
        raise FlagError(f"--teacher: {e}") from None
    if args.teacher not in PRESETS and not real and not Path(args.teacher).is_dir():
        raise FlagError(f"--teacher {args.teacher}: not a preset ({', '.join(PRESETS)}, "
                        f"{real_preset_help()}) and not a directory")
    check_data_flags(parser, args)


def parse_args(argv=None):
    parser = build_parser()
    return parser.parse_flags(argv, lambda args: validate(parser, args))


def main(argv=None) -> int:
    return run_command(lambda: parse_args(argv), generate_all, (RationaleError, DataError, ModelError))
