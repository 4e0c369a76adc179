"""Command-line flags of `prada_fast/train.py` (every flag is explained by --help): the
shared ones from prada_fast/common/flags.py, the trainer's own here with their ranges
(RANGES), and `validate`: values with a syntax of their own, paths and combinations. All
are checked before any work."""
from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

from prada_fast.common.flags import (
    DEFAULT_DS,
    FlagError,
    FlagParser,
    above,
    add_data_flags,
    add_generation_flags,
    add_knob_flags,
    add_model_flags,
    add_run_flags,
    at_least,
    check_data_flags,
    check_model_dirs,
    deprecated,
    flag,
    within,
)
from prada_fast.models import PRESETS
from prada_fast.models.config import PROMPT_INITS
from prada_fast.models.hub import PRETRAINED_LR, PRETRAINED_WARMUP
from prada_fast.trainer.rundir import RunDirError, check_output_dir

__all__ = ["DEFAULT_DS", "FlagError", "RANGES", "build_parser", "parse_args", "teacher_fit_note",
           "validate"]

# The ranges of the trainer's own numeric flags: dest -> (test, what it must be); the shared
# flags' ranges come with them (common/flags.py). One check (common.flags.check_ranges)
# reads both from the parser. tests/test_cli.py gives every flag of the parser a bad value,
# so a new flag needs a range here, a check in validate, or an entry there saying that no
# value is bad.
RANGES = {
    "stop_after": at_least(0), "keep_checkpoints": at_least(0),
    "probe_every": at_least(0), "max_bad_steps": at_least(1), "tokens_per_batch": at_least(0),
    "mlp_hidden": at_least(0), "prompt_hidden": at_least(0), "alpha": within(0, 1),
    "lambda_gamma": above(0), "pool_layer": at_least(0), "lr": above(0),
    "teacher_memo_mb": at_least(0),
}


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="prada_fast/train.py",
        description="PRADA: prompt-assisted, domain-adversarial distillation of chain-of-thought "
                    "reasoning from a teacher into a student, under DeepSpeed ZeRO-3. Run with "
                    "`deepspeed prada_fast/train.py --ds ds_configs/zero3.json`, torchrun, or "
                    "plain python (one process).",
        ranges=RANGES)
    io = p.add_argument_group("run")
    add_run_flags(p, io, ("ds", "one_rank_zero"))
    io.add_argument("--output-dir", default="runs/prada", metavar="DIR",
                    help="where metrics.jsonl, summary.json, checkpoints/ and final/ go")
    io.add_argument("--resume", action="store_true",
                    help="continue the run in --output-dir from its latest checkpoint")
    io.add_argument("--overwrite", action="store_true",
                    help="delete an existing run in --output-dir and start afresh")
    add_run_flags(p, io, ("max_steps",), max_steps=dict(help=(
        "optimizer steps of the run (python -m prada_fast.experiments.compare defaults to 400 "
        "per run instead: it trains 15 of them)")))
    io.add_argument("--stop-after", type=int, default=0, metavar="N",
                    help="end this invocation after N optimizer steps, checkpointed, as if "
                         "interrupted (the schedules still follow --max-steps); for time-sliced jobs")
    add_run_flags(p, io, ("save_every",))
    io.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                    help="keep only the newest N checkpoints (0: all); keep 2 or more so that "
                         "--resume has a complete one to fall back on")
    add_run_flags(p, io, ("log_every",))
    io.add_argument("--probe-every", type=int, default=0, metavar="N",
                    help="every N steps (and at the last), the domain head's accuracy and a freshly "
                         "fitted linear probe's (cross-validated) on the held-out records' pooled "
                         "question features, as probe_head_acc and probe_acc in metrics.jsonl: "
                         "the curves that say whether the student hides the domain or fools its "
                         "head (0: off; needs --eval-per-domain >= 2)")
    io.add_argument("--layer-probes", action="store_true",
                    help="at the evaluations before and after training, also fit the fresh domain "
                         "probe on every layer's question-pooled output, from the input embeddings "
                         "to the final states (summary.json: domain_alignment.layer_probe_accuracy "
                         "and _before; the comparison turns it on). Costs L + 1 probes per evaluation")
    add_run_flags(p, io, ("seed", "no_progress"))
    io.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                    help="also write the metrics of metrics.jsonl and the final evaluation to "
                         "TensorBoard, under DIR/tensorboard (needs the tensorboard package: "
                         "pip install -e '.[tensorboard]')")
    add_run_flags(p, io, ("dist_timeout",))
    io.add_argument("--max-bad-steps", type=int, default=5, metavar="K",
                    help="stop (with a checkpoint of the last good state) after K optimizer steps "
                         "in a row with a non-finite loss or gradient; such steps are skipped")
    io.add_argument("--inject-nan", default="", metavar="STEPS",
                    help="fault injection for tests: make the loss NaN at these 1-based steps (e.g. 3,4)")
    add_run_flags(p, io, ("local_rank",))

    data = p.add_argument_group("data")
    add_data_flags(p, data, ("data", "data_seed", "source_domains", "target_domains", "skip_bad", "max_len"))
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
    add_data_flags(p, data, ("eval_per_domain",))

    model = p.add_argument_group("models")
    add_model_flags(p, model, ("student", "teacher", "teacher_seed", "teacher_steps", "teacher_lr",
                               "teacher_fit_cache"))
    model.add_argument("--teacher-outputs", metavar="DIR",
                       help="distil from a cache of the teacher's outputs that `python -m "
                            "prada_fast.precompute_teacher --out DIR` wrote (hidden states: the "
                            "exact KD of the live teacher; or top-k log-probabilities): no teacher "
                            "is built. A cache made from other data, tokenizer, --max-len, "
                            "--temperature (top-k) or teacher is refused")
    model.add_argument("--teacher-memo-mb", type=int, default=1024, metavar="MB",
                       help="keep the live teacher's final hidden states at each training "
                            "record's labelled positions in host memory, up to MB megabytes, so "
                            "that the frozen teacher runs once per record instead of once per "
                            "epoch (the exact KD, like a hidden-state --teacher-outputs cache, "
                            "built as the run goes; records past the cap are recomputed each "
                            "time). The default main job keeps 16.5 MB (647 distinct labelled records "
                            "x ~36 labelled tokens x 192 floats); a teacher of width H costs 4 H bytes a "
                            "labelled token (fp32). 0: off")
    add_knob_flags(p, model, ("prompt_len", "prompt_encoder"))
    model.add_argument("--prompt-hidden", type=int, default=0, metavar="H",
                       help="width of the prompt encoder (0: the student's hidden size)")
    model.add_argument("--prompt-init", choices=PROMPT_INITS, default="random",
                       help="the soft prompt's starting vectors: random (Gaussian at the scale of "
                            "the student's input embeddings) or vocab (the embeddings of "
                            "--prompt-len tokens drawn from the vocabulary, as prompt tuning "
                            "starts a pretrained model, Lester et al. 2021); moot with "
                            "--prompt-len 0, so that compare --extra can pass it to every arm")
    model.add_argument("--domain-head", choices=("linear", "mlp"), default="linear",
                       help="domain classifier on pooled hidden states (linear runs in the fused op)")
    model.add_argument("--mlp-hidden", type=int, default=0, help="width of the MLP head (0: H)")
    model.add_argument("--pool", choices=("question", "sequence"), default="question",
                       help="positions the domain features average over: the question only, or "
                            "every token (rationale and answer too: the head can then tell "
                            "labelled sources from unlabelled targets by length alone)")
    model.add_argument("--pool-layer", type=int, default=None, metavar="L",
                       help="the domain features pool the output of the student's decoder layer L "
                            "(0: the input embeddings) instead of its final normed hidden states: "
                            "the adversary then works on an intermediate representation (the head "
                            "runs in plain PyTorch beside the loss op; the layer probes of "
                            "`python -m prada_fast.experiments.layers` show where the domain is "
                            "readable). Default: the final states")
    add_model_flags(p, model, ("attn",))

    obj = p.add_argument_group("objective")
    obj.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "reference"),
                     help="implementation of the loss op; auto: triton on CUDA, chunked elsewhere")
    obj.add_argument("--alpha", type=float, default=0.5, help="weight of hard CE vs soft KD")
    add_model_flags(p, obj, ("temperature",))
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
    add_knob_flags(p, obj, ("domain_head_lr_mult", "domain_steps", "lm_weight"))
    obj.add_argument("--lambda-schedule", choices=("dann", "constant"), default="dann",
                     help="schedule of lambda, the adversary's scale (every adversary's: grl, "
                          "confusion, mmd): the DANN ramp 2/(1+exp(-gamma p))-1 up to --lambda-max, "
                          "or constant")
    deprecated(p, obj, "--grl-schedule", "lambda_schedule", choices=("dann", "constant"))
    add_knob_flags(p, obj, ("lambda_max",))
    obj.add_argument("--lambda-gamma", type=float, default=10.0, help="gamma of the DANN schedule")
    deprecated(p, obj, "--grl-gamma", "lambda_gamma", type=float)
    obj.add_argument("--lr", type=float,
                     help="override the optimizer lr of the DeepSpeed config. Default: the config's "
                          f"lr, except for a pretrained student from `prada_fast.models` (a real "
                          f"preset such as smollm2-135m-l8, or its directory): {PRETRAINED_LR:g} with "
                          f"{PRETRAINED_WARMUP} warm-up steps (at most a tenth of the run), chosen by "
                          "an lr sweep (docs/results.md): the configs' 2e-3 is for tiny students "
                          "trained from scratch and wrecks a pretrained one")

    ev = p.add_argument_group("evaluation")
    add_generation_flags(p, ev, ("max_new_tokens", "eval_batch_size"))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked (ranges, then `validate`); a bad one exits 2 with one line
    naming it."""
    return build_parser().parse_flags(argv, validate, prepare=default_data)


def default_data(args) -> None:
    args.data = args.data or ["synthetic"]


def teacher_fit_note(args) -> str | None:
    """A line for the log when --teacher-steps or --teacher-lr were given a value and no
    teacher is fitted (only `--teacher auto` with a random-weight preset student fits one):
    they would otherwise be ignored without a word, e.g. with `--teacher smollm2-135m`."""
    if args.teacher == "auto" and args.student in PRESETS and not args.teacher_outputs:
        return None
    parser = _parser()
    changed = [flag(parser, dest) for dest in ("teacher_steps", "teacher_lr")
               if getattr(args, dest) != parser.get_default(dest)]
    if not changed:
        return None
    what = (f"--teacher-outputs {args.teacher_outputs}" if args.teacher_outputs
            else f"--teacher {args.teacher}")
    return (f"note: {' and '.join(changed)} set the fit of the auto teacher (a random-weight preset "
            f"student's), and this run fits none ({what}): they are not used. To fit a real "
            f"teacher on the rationales first, train it as the student (--student TEACHER "
            f"--teacher none --no-domain-loss --prompt-len 0), then give --teacher RUN_DIR/final")


# ----------------------------------------------------------------------------- validation
@functools.lru_cache(maxsize=1)
def _parser() -> FlagParser:
    return build_parser()


def validate(args) -> None:
    """Every flag checked before any work (data, teacher, models, the output directory):
    values with a syntax of their own, paths, and combinations (the ranges are checked
    before, from the parser). Raises FlagError naming the flag. Reads files' presence only;
    writes nothing."""
    _check_values(args)
    _check_paths(args)
    _check_combinations(args)


def _check_values(args) -> None:
    """Flags with a syntax of their own."""
    check_data_flags(_parser(), args)
    steps = [s.strip() for s in args.inject_nan.split(",")] if args.inject_nan else []
    if not all(s.isdigit() and int(s) >= 1 for s in steps):
        raise FlagError(f"--inject-nan {args.inject_nan!r}: expected comma-separated step numbers >= 1")


def _check_paths(args) -> None:
    """Files and directories the flags name: present, and of the right kind."""
    try:
        check_output_dir(Path(args.output_dir), resume=args.resume, overwrite=args.overwrite)
    except RunDirError as e:
        raise FlagError(str(e)) from None
    check_model_dirs(_parser(), args)
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
    if args.mlp_hidden and args.domain_head != "mlp":
        raise FlagError(f"--mlp-hidden {args.mlp_hidden} sets the width of an MLP head: it needs "
                        "--domain-head mlp")
    if args.prompt_encoder != "none" and args.prompt_len == 0:
        raise FlagError(f"--prompt-encoder {args.prompt_encoder} encodes the soft prompt: it needs "
                        "--prompt-len 1 or more")
    if args.prompt_hidden and args.prompt_encoder == "none":
        raise FlagError(f"--prompt-hidden {args.prompt_hidden} sets the width of a prompt encoder: "
                        "it needs --prompt-encoder mlp or lstm")
    if args.domain_steps and (args.no_domain_loss or args.adversary == "mmd"):
        raise FlagError(f"--domain-steps {args.domain_steps} trains the domain head against the "
                        "student: " + ("--no-domain-loss has no domain head" if args.no_domain_loss else
                                       "--adversary mmd has none (its head only watches); use grl "
                                       "or confusion, or --domain-steps 0"))
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
