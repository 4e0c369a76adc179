"""Command-line flags of `prada_fast/train.py` (every flag is explained by --help), and
`validate`: every flag's range and every combination, checked before any work."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

from prada_fast.data import SYNTHETIC_TARGET, DataError
from prada_fast.data.spec import check_spec
from prada_fast.models import PRESETS, ModelError, check_model_dir
from prada_fast.models.prompts import PROMPT_ENCODERS
from prada_fast.trainer.rundir import RunDirError, check_output_dir

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DS = REPO / "ds_configs" / "zero3.json"


class FlagParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line on stderr (`error: ...`, exit 2);
    under a launcher only rank 0 prints it (every rank exits 2)."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


class DeprecatedAlias(argparse.Action):
    """An old name of a flag: stores into the new flag's dest and remembers the name used,
    so that `parse_args` warns and errors name the flag as typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        used = getattr(namespace, "deprecated_flags", None) or {}
        namespace.deprecated_flags = {**used, self.dest: option_string}


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="prada_fast/train.py",
        description="PRADA: prompt-assisted, domain-adversarial distillation of chain-of-thought "
                    "reasoning from a teacher into a student, under DeepSpeed ZeRO-3. Run with "
                    "`deepspeed prada_fast/train.py --ds ds_configs/zero3.json`, torchrun, or "
                    "plain python (one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("run")
    io.add_argument("--ds", default=str(DEFAULT_DS), metavar="JSON",
                    help="DeepSpeed config (ZeRO stage, batch sizes, optimizer, precision); "
                         "'auto' values are filled in by the trainer")
    io.add_argument("--output-dir", default="runs/prada", metavar="DIR",
                    help="where metrics.jsonl, summary.json, checkpoints/ and final/ go")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --output-dir from its latest checkpoint")
    io.add_argument("--overwrite", action="store_true",
                    help="delete an existing run in --output-dir and start afresh")
    io.add_argument("--max-steps", type=int, default=1000, help="optimizer steps of the run")
    io.add_argument("--stop-after", type=int, default=0, metavar="N",
                    help="end this invocation after N optimizer steps, checkpointed, as if "
                         "interrupted (the schedules still follow --max-steps); for time-sliced jobs")
    io.add_argument("--save-every", type=int, default=250, metavar="N",
                    help="steps between ZeRO checkpoints (0: only at the end)")
    io.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                    help="keep only the newest N checkpoints (0: all); keep 2 or more so that "
                         "--resume has a complete one to fall back on")
    io.add_argument("--log-every", type=int, default=10, metavar="N",
                    help="steps between lines of metrics.jsonl")
    io.add_argument("--probe-every", type=int, default=0, metavar="N",
                    help="every N steps (and at the last), the domain head's accuracy and a freshly "
                         "fitted linear probe's (cross-validated) on the held-out records' pooled "
                         "question features, as probe_head_acc and probe_acc in metrics.jsonl: "
                         "the curves that say whether the student hides the domain or fools its "
                         "head (0: off; needs --eval-per-domain >= 2)")
    io.add_argument("--seed", type=int, default=0, help="seed of data order, init and synthetic data")
    io.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    io.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                    help="also write the metrics of metrics.jsonl and the final evaluation to "
                         "TensorBoard, under DIR/tensorboard (needs the tensorboard package: "
                         "pip install -e '.[tensorboard]')")
    io.add_argument("--dist-timeout", type=float, default=5.0, metavar="MIN",
                    help="process-group timeout in minutes: a rank that hangs in a collective ends "
                         "the job after this (a rank that dies ends it at once)")
    io.add_argument("--max-bad-steps", type=int, default=5, metavar="K",
                    help="stop (with a checkpoint of the last good state) after K optimizer steps "
                         "in a row with a non-finite loss or gradient; such steps are skipped")
    io.add_argument("--inject-nan", default="", metavar="STEPS",
                    help="fault injection for tests: make the loss NaN at these 1-based steps (e.g. 3,4)")
    io.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                    help="set by the deepspeed launcher; ignore")

    data = p.add_argument_group("data")
    data.add_argument("--data", action="append", metavar="SPEC",
                      help="a data source, repeatable (default: synthetic): 'synthetic[:N[:dom,..]]' "
                           "(built-in generator, N per domain); a file named gsm8k*.jsonl, "
                           "aqua*.json or strategyqa*.json, or written by prada_fast.rationales; "
                           "'FORMAT:PATH[?key=value&...]' with FORMAT "
                           "gsm8k|aqua|strategyqa|jsonl|hf|rationales (jsonl/hf take question=, "
                           "rationale=, answer=, domain= or domain_field=, a column or a template "
                           "of several, question={Body} {Question}; hf also split=); a "
                           "'#N' suffix keeps the first N records")
    data.add_argument("--source-domains", metavar="A,B",
                      help="labelled domains (default: every domain not named as a target)")
    data.add_argument("--target-domains", metavar="C",
                      help="unlabelled domains: they feed the domain loss only (default: "
                           f"'{SYNTHETIC_TARGET}' for synthetic data, none otherwise)")
    data.add_argument("--skip-bad", action="store_true",
                      help="skip malformed records (and report their count) instead of stopping")
    data.add_argument("--max-len", type=int, default=192, help="tokens per sequence")
    data.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                      help="pack the examples of each micro-batch into rows of at most --max-len + "
                           "--prompt-len positions (each sequence with its own soft prompt, its "
                           "position ids restarting at 0, attention kept within it) instead of "
                           "padding each example to the longest: the same loss and gradients, "
                           "less compute spent on padding; --no-packing pads")
    data.add_argument("--tokens-per-batch", type=int, default=0, metavar="N",
                      help="fill each micro-batch with examples up to N tokens (soft prompt "
                           "included; at least one example) instead of the DeepSpeed config's "
                           "train_micro_batch_size_per_gpu examples; the config's batch sizes then "
                           "set only the accumulation steps (0: off)")
    data.add_argument("--on-long", choices=("truncate", "refuse"), default=None,
                      help="training records over --max-len: 'truncate' cuts them, even to no "
                           "labelled token; 'refuse' stops at the first. Default: cut them, but "
                           "stop if a labelled record would keep no labelled token")
    data.add_argument("--eval-per-domain", type=int, default=64, metavar="N",
                      help="records per domain held out for answer accuracy (0: no evaluation)")

    model = p.add_argument_group("models")
    model.add_argument("--student", default="tiny", metavar="NAME|DIR",
                       help=f"student: a preset ({', '.join(PRESETS)}) or a local HF model directory")
    model.add_argument("--teacher", default="auto", metavar="auto|none|NAME|DIR",
                       help="frozen teacher of the same vocabulary; 'auto': with a preset student, "
                            "fit the 'tiny-teacher' preset on the rationales first (cached)")
    model.add_argument("--teacher-steps", type=int, default=300, help="steps of the auto teacher fit")
    model.add_argument("--teacher-lr", type=float, default=3e-3, help="lr of the auto teacher fit")
    model.add_argument("--teacher-fit-cache", metavar="DIR",
                       help="folder of the fitted auto teachers (default: $PRADA_FAST_CACHE/teachers "
                            "or ~/.cache/prada_fast/teachers)")
    model.add_argument("--teacher-cache", dest="teacher_fit_cache", metavar="DIR",
                       action=DeprecatedAlias, help="deprecated name of --teacher-fit-cache")
    model.add_argument("--teacher-outputs", metavar="DIR",
                       help="distil from a cache of the teacher's outputs that `python -m "
                            "prada_fast.precompute_teacher --out DIR` wrote (hidden states: the "
                            "exact KD of the live teacher; or top-k log-probabilities): no teacher "
                            "is built. A cache made from other data, tokenizer, --max-len, "
                            "--temperature (top-k) or teacher is refused")
    model.add_argument("--prompt-len", type=int, default=8, metavar="K",
                       help="learned soft-prompt vectors before the input (0: none)")
    model.add_argument("--prompt-encoder", choices=PROMPT_ENCODERS, default="none",
                       help="P-tuning: produce the soft prompt from free vectors through an MLP or "
                            "a BiLSTM + MLP while training (the export saves its output as plain "
                            "vectors); none: train the vectors directly")
    model.add_argument("--prompt-hidden", type=int, default=0, metavar="H",
                       help="width of the prompt encoder (0: the student's hidden size)")
    model.add_argument("--domain-head", choices=("linear", "mlp"), default="linear",
                       help="domain classifier on pooled hidden states (linear runs in the fused op)")
    model.add_argument("--mlp-hidden", type=int, default=0, help="width of the MLP head (0: H)")
    model.add_argument("--pool", choices=("question", "sequence"), default="question",
                       help="positions the domain features average over: the question only, or "
                            "every token (rationale and answer too: the head can then tell "
                            "labelled sources from unlabelled targets by length alone)")
    model.add_argument("--attn", default="auto",
                       choices=("auto", "sdpa", "eager", "flash_attention_2"),
                       help="attention; auto: flash_attention_2 if flash-attn imports on CUDA, else sdpa")

    obj = p.add_argument_group("objective")
    obj.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"),
                     help="implementation of the loss op; auto: triton on CUDA, chunked elsewhere")
    obj.add_argument("--alpha", type=float, default=0.5, help="weight of hard CE vs soft KD")
    obj.add_argument("--temperature", type=float, default=1.0, help="distillation temperature tau")
    obj.add_argument("--no-domain-loss", action="store_true",
                     help="plain CoT distillation: no domain classifier term")
    obj.add_argument("--adversary", choices=("grl", "confusion", "mmd"), default="confusion",
                     help="what the student learns against the domain head: 'confusion' pushes the "
                          "head's output towards uniform over the domains (bounded); 'grl' reverses "
                          "the head's gradient (DANN; the student can make the head confidently "
                          "wrong instead); 'mmd' is no adversary: lambda times a Gaussian-kernel MMD "
                          "between the domains' pooled features pulls them together in every "
                          "direction, and the head only watches (it trains, nothing flows back). "
                          "The default is what the comparison's tuning picked (docs/results.md)")
    obj.add_argument("--domain-head-lr-mult", type=float, default=10.0, metavar="X",
                     help="the domain head's learning rate over the student's (its own optimizer "
                          "parameter group; needs a scheduler that keeps each group's lr, as the "
                          "shipped configs' WarmupCosineLR; 1 puts the head in the student's group)")
    obj.add_argument("--grl-schedule", choices=("dann", "constant"), default="dann",
                     help="lambda schedule of the adversarial scale")
    obj.add_argument("--lambda-max", type=float, default=1.0, help="largest adversarial scale lambda")
    obj.add_argument("--grl-gamma", type=float, default=10.0, help="gamma of the DANN schedule")
    obj.add_argument("--lr", type=float, help="override the optimizer lr of the DeepSpeed config")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--max-new-tokens", type=int, default=80, help="greedy decoding budget")
    ev.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generate call")
    return p


def parse_args(argv=None, parser=None, check=None) -> argparse.Namespace:
    """The flags, each checked (`check`, default `validate`); a bad one exits 2 with one line
    naming it. `parser` and `check` let another command with the trainer's flags reuse this."""
    parser = parser or build_parser()
    check = check or validate
    args = parser.parse_args(argv)
    args.data = args.data or ["synthetic"]
    try:
        check(args)
    except FlagError as e:
        parser.error(str(e))
    warn_deprecated(args)
    return args


def warn_deprecated(args) -> None:
    """One warning line per deprecated flag name used (rank 0)."""
    for dest, used in (getattr(args, "deprecated_flags", None) or {}).items():
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"warning: {used} is deprecated, use {flag(dest)}\n")


# ----------------------------------------------------------------------------- validation
class FlagError(ValueError):
    """A flag out of its range, or contradicting another flag; the message names it."""


def flag(dest: str) -> str:
    """The option string of an argparse dest ("max_steps" -> "--max-steps")."""
    for a in build_parser()._actions:
        if a.dest == dest and a.option_strings:
            return a.option_strings[0]
    raise KeyError(dest)


def _at_least(lo):
    return (lambda v: v >= lo), f"must be >= {lo}"


def _above(lo):
    return (lambda v: v > lo), f"must be > {lo}"


def _within(lo, hi):
    return (lambda v: lo <= v <= hi), f"must be in [{lo}, {hi}]"


# One row per numeric flag: dest -> (test, what it says). A float must also be finite; None
# (an unset optional flag) passes. tests/test_cli.py gives every flag of the parser a bad
# value, so a new flag needs a row here, a check in validate, or an entry there saying
# that no value is bad.
RANGES = {
    "max_steps": _at_least(1), "stop_after": _at_least(0), "save_every": _at_least(0),
    "keep_checkpoints": _at_least(0), "log_every": _at_least(1), "probe_every": _at_least(0),
    "seed": _within(0, 2**32 - 1),
    "dist_timeout": _above(0), "max_bad_steps": _at_least(1), "local_rank": _at_least(-1),
    "max_len": _at_least(2), "eval_per_domain": _at_least(0), "tokens_per_batch": _at_least(0),
    "teacher_steps": _at_least(1), "teacher_lr": _above(0), "prompt_len": _at_least(0),
    "mlp_hidden": _at_least(0), "prompt_hidden": _at_least(0),
    "alpha": _within(0, 1), "temperature": _above(0), "lambda_max": _at_least(0),
    "grl_gamma": _above(0), "lr": _above(0), "domain_head_lr_mult": _above(0),
    "max_new_tokens": _at_least(1), "eval_batch_size": _at_least(1),
}


def validate(args) -> None:
    """Every flag checked before any work (data, teacher, models, the output directory):
    ranges (RANGES), values with a syntax of their own, paths, and combinations. Raises
    FlagError naming the flag. Reads files' presence only; writes nothing."""
    for dest, (ok, what) in RANGES.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            raise FlagError(f"{flag(dest)} {v}: {what}")
    _check_values(args)
    _check_paths(args)
    _check_combinations(args)


def _domains(args, dest: str) -> list[str]:
    value = getattr(args, dest)
    names = [d.strip() for d in value.split(",")] if value is not None else []
    if value is not None and (not names or not all(names)):
        raise FlagError(f"{flag(dest)} {value!r}: expected comma-separated domain names")
    return names


def _check_values(args) -> None:
    """Flags with a syntax of their own."""
    for spec in args.data:
        try:
            check_spec(spec)
        except DataError as e:
            raise FlagError(f"--data: {e}") from None
    _domains(args, "source_domains")
    _domains(args, "target_domains")
    steps = [s.strip() for s in args.inject_nan.split(",")] if args.inject_nan else []
    if not all(s.isdigit() and int(s) >= 1 for s in steps):
        raise FlagError(f"--inject-nan {args.inject_nan!r}: expected comma-separated step numbers >= 1")


def _check_paths(args) -> None:
    """Files and directories the flags name: present, and of the right kind."""
    if not Path(args.ds).is_file():
        raise FlagError(f"--ds {args.ds}: no such file")
    try:
        check_output_dir(Path(args.output_dir), args)
    except RunDirError as e:
        raise FlagError(str(e)) from None
    for dest, tokenizer in (("student", True), ("teacher", False)):
        name = getattr(args, dest)
        if name in PRESETS or (dest == "teacher" and name in ("auto", "none")):
            continue
        try:
            check_model_dir(name, tokenizer=tokenizer)
        except ModelError as e:
            raise FlagError(f"{flag(dest)}: {e}") from None
    fit_cache = args.teacher_fit_cache
    if fit_cache and Path(fit_cache).exists() and not Path(fit_cache).is_dir():
        name = (getattr(args, "deprecated_flags", None) or {}).get("teacher_fit_cache")
        raise FlagError(f"{name or '--teacher-fit-cache'} {fit_cache}: a file, not a directory")
    if getattr(args, "teacher_outputs", None):
        if args.teacher == "none":
            raise FlagError("--teacher-outputs is a teacher's outputs: it contradicts --teacher none")
        from prada_fast.teacher.cache import TeacherCacheError, open_manifest
        try:
            open_manifest(Path(args.teacher_outputs))
        except TeacherCacheError as e:
            raise FlagError(str(e)) from None


def _check_combinations(args) -> None:
    """Flags that contradict each other."""
    if args.resume and args.overwrite:
        raise FlagError("--resume and --overwrite exclude each other")
    both = sorted(set(_domains(args, "source_domains")) & set(_domains(args, "target_domains")))
    if both:
        raise FlagError(f"--source-domains and --target-domains both name {', '.join(both)}")
    if args.mlp_hidden and args.domain_head != "mlp":
        raise FlagError(f"--mlp-hidden {args.mlp_hidden} sets the width of an MLP head: it needs "
                        "--domain-head mlp")
    if args.prompt_encoder != "none" and args.prompt_len == 0:
        raise FlagError(f"--prompt-encoder {args.prompt_encoder} encodes the soft prompt: it needs "
                        "--prompt-len 1 or more")
    if args.prompt_hidden and args.prompt_encoder == "none":
        raise FlagError(f"--prompt-hidden {args.prompt_hidden} sets the width of a prompt encoder: "
                        "it needs --prompt-encoder mlp or lstm")
    if args.probe_every and args.eval_per_domain < 2:
        raise FlagError(f"--probe-every {args.probe_every} probes the held-out records: it needs "
                        f"--eval-per-domain 2 or more (given {args.eval_per_domain})")
    no_teacher = not args.teacher_outputs and (
        args.teacher == "none" or (args.teacher == "auto" and args.student not in PRESETS))
    if args.alpha == 0 and no_teacher:
        why = " with a non-preset student" if args.teacher == "auto" else ""
        raise FlagError("--alpha 0 trains on the distillation term alone, but there is no teacher "
                        f"(--teacher {args.teacher}{why})")
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise FlagError("--report-to tensorboard needs the tensorboard package "
                        "(pip install -e '.[tensorboard]')")
    if args.attn == "flash_attention_2":
        import torch
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise FlagError("--attn flash_attention_2 needs a CUDA device and the flash-attn package "
                            "(pip install -e '.[gpu]'); use --attn sdpa")
