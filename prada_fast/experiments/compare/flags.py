"""The flags of `python -m prada_fast.experiments.compare` (the shared ones from
prada_fast/common/flags.py, as the trainer's) and the target domains they name."""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from prada_fast.common.flags import (
    FlagParser,
    add_data_flags,
    add_knob_flags,
    add_model_flags,
    add_run_flags,
    at_least,
    deprecated,
    within,
)
from prada_fast.data import SYNTHETIC_TARGET
from prada_fast.data.synthetic import STORY_BENCHMARK, STORY_PSEUDO_TARGET, STORY_TARGET

from .variants import DEFAULT_VARIANTS, VARIANT_KEYS, variants


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


EPILOG = """\
layout of --output-dir:
  runs/<target>/<variant>/seed<S>/   one trainer run (metrics.jsonl, summary.json, final/,
                                     compare_run.json, and its record pooled_features.pt:
                                     what the report reads besides, with --drop-weights all)
  runs/<target>/<variant>/seed<S>.log  its console output
  runs/<target>/<variant>/seed<S>.started.json  the flags of a run not yet finished
  teachers/                          the auto teachers: one per target (and per tuning split)
                                     for all seeds and variants (--teacher-per-seed: per seed)
  report.md, report.json, pca_<target>.png, loss_curves_<target>.png

cost (tiny student, 2 CPU cores; timed on 2026-12-03 with /usr/bin/time, hypervisor steal
from vmstat): the default command (1 target x 4 seeds x 4 arms of 400 steps, one teacher fit of
200 steps) took 21.1 min with the default --jobs 2 (steal 0.8 %); one run at a time
(--jobs 1) it took 41.0 min (steal 6.6 % on average, 25-30 % at times). The first run fits
the teacher alone (~230 s; one thread then, every core now); then two runs at once take
~120-145 s, i.e. ~65 s a run. One run alone on quiet cores: 103 s (2 threads); two at once,
one thread each: 121 s for both.
On cores shared with other jobs it is several times that: on 2026-12-01, with tests running
beside it, one 400-step run took ~20 min. --tune adds its tuning runs (with the default arms and
grids: 1 (A) + 2 LM weights (B) + 6 confusion settings + 3 prompt encoders = 12 per tuning seed,
and one teacher fit for the tuning split).
--targets all: x the number of domains. Interrupted? Run the same command again: finished runs are
reused and an unfinished one resumes from its latest checkpoint (--save-every).
Quote --extra values that start with "--": --extra="--lr 1e-3".

examples:
  # real data: GSM8K + StrategyQA labelled sources, AQuA the unlabelled target
  python -m prada_fast.experiments.compare --targets aqua \\
      --data data/gsm8k_train.jsonl#400 --data data/strategyqa_train.json#400 \\
      --data data/aqua_dev.json --extra "--max-len 512"
  # bigger models on GPUs (ZeRO-3 over 8 ranks per run)
  python -m prada_fast.experiments.compare --nproc 8 --ds ds_configs/zero3.json \\
      --student /models/qwen2.5-0.5b --teacher /models/qwen2.5-7b --max-steps 2000 ...
  # rebuild the report from finished runs only
  python -m prada_fast.experiments.compare --report-only
"""


# the comparison's own numeric flags (the shared ones bring theirs)
RANGES = {"nproc": at_least(1), "probe_folds": at_least(1), "jobs": at_least(1), "threads": at_least(1),
          "tune_source_drop": within(0, 1)}


def build_parser() -> FlagParser:
    p = FlagParser(
        prog="python -m prada_fast.experiments.compare",
        description="Train (A) plain CoT distillation, (B) CoT + an LM term on every domain's "
                    "questions, (C) PRADA and (D) PRADA + the LM term (and on request each "
                    "adversary alone), with the same steps, data, teacher and seeds, leave-one-"
                    "domain-out, and write a report (report.md, report.json, PNG plots) under "
                    "--output-dir: per arm the mean over seeds and the paired 95 % intervals "
                    "against (A) and (B); PRADA helps only where (C) or (D) beats (B). Default: the "
                    f"story benchmark ({STORY_BENCHMARK}, target '{STORY_TARGET}') on the CPU, 4 arms "
                    "x 4 seeds: 21 minutes on 2 CPU cores (measured, see below).",
        epilog=EPILOG, formatter_class=_Help, ranges=RANGES)
    e = p.add_argument_group("experiment")
    e.add_argument("--output-dir", default="runs/compare", metavar="DIR",
                   help="where the runs, teachers, report and plots go (layout below)")
    e.add_argument("--seeds", default="0,1,2,3", metavar="S,S,...",
                   help="seeds of the student: its initialisation (soft prompt and domain head "
                        "included) and the data order, the same for every variant. The data, "
                        "the held-out split and the teacher are shared by all seeds (see "
                        "--teacher-seed)")
    add_model_flags(p, e, ("teacher_seed",), teacher_seed=dict(
        default=0, help="one teacher for all seeds, so that the seeds vary the student only: every "
                        "run gets the trainer's --teacher-seed S and --data-seed S, so the auto "
                        "teacher is fitted once (per target and tuning split) on the records of "
                        "data seed S, and every seed trains and evaluates on those records (a "
                        "teacher shared across other data seeds would have been fitted on some "
                        "seed's held-out records). A named --teacher (a directory, a real preset) "
                        "is one teacher anyway; the data are still shared"))
    e.add_argument("--teacher-per-seed", action="store_true",
                   help="the behaviour before --teacher-seed: each seed fixes its own data, "
                        "held-out split and auto teacher (shared by the variants of that seed)")
    e.add_argument("--targets", metavar="DOM,...|all",
                   help="held-out (unlabelled) target domain(s), one leave-one-domain-out "
                        "experiment each; 'all' rotates over every domain of the data (cost: "
                        f"x number of domains). Default: '{STORY_TARGET}' for the default data, "
                        f"'{SYNTHETIC_TARGET}' for other synthetic data; "
                        "required with other data")
    e.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), metavar="V,...",
                   help="which of " + ", ".join(VARIANT_KEYS) + " to train: (A) cot, plain CoT "
                        "distillation; (B) cot-lm, CoT + the LM term on every domain's questions "
                        "(the target's unlabelled text used without an adversary); grl, confusion: "
                        "an adversary alone; (C) prada-ADV: soft prompt + adversary; (D) "
                        "prada-ADV-lm: (C) + the LM term")
    add_knob_flags(p, e, ("prompt_len",), prompt_len=dict(
        help="soft-prompt length of the PRADA variants; the others use 0"))

    k = p.add_argument_group(
        "the protocol's knobs",
        "lambda_max, the head's lr multiplier and the prompt encoder, given here or chosen by "
        "--tune on the source domains alone: one source is held out as a pseudo-target (its "
        "records unlabelled, the real target's records absent) and each setting is judged by "
        "the pseudo-target's answer accuracy (mean over --tune-seeds; ties: source accuracy) "
        "among the settings that keep the source accuracy within --tune-source-drop of plain "
        "CoT's (A) on the same split. "
        "The adversary's knobs are chosen on the adversarial-only variant and reused by PRADA "
        "with that adversary; then the prompt encoder is chosen on the PRADA variant. The real "
        "target's records are never looked at before the main runs.")
    add_knob_flags(p, k, ("lambda_max", "domain_head_lr_mult", "domain_steps", "prompt_encoder", "lm_weight"),
                   lm_weight=dict(default=1.0, help=(
                       "weight of the LM term of the -lm arms (the trainer's --lm-weight). 1: the "
                       "question tokens' mean next-token CE is added to the task loss alpha CE + "
                       "(1 - alpha) KD at full weight, so at the default alpha 0.5 it weighs as "
                       "much as the whole task loss and twice its CE term (the plain sum of the two "
                       "losses, as in mixed task-adaptive training); not measured against other "
                       "values unless --tune chooses it from --tune-lm-weights")),
                   lambda_max=dict(help="largest adversarial scale"),
                   domain_head_lr_mult=dict(help="the domain head's lr over the student's (the "
                                                 "trainer's flag of the same name)"),
                   domain_steps=dict(help="the domain head's own updates per student step in the "
                                          "adversarial arms (the trainer's flag of the same name, "
                                          "DomainBed's d_steps_per_g_step; not tuned; 0: joint)"),
                   prompt_encoder=dict(help="P-tuning encoder of the PRADA variants' soft prompt"))
    deprecated(p, k, "--head-lr-mult", "domain_head_lr_mult", type=float, metavar="X")
    k.add_argument("--tune", action="store_true",
                   help="choose the knobs per target and adversary on a pseudo-target first "
                        "(the flags above are then ignored)")
    k.add_argument("--pseudo-target", metavar="DOM",
                   help=f"the source held out for tuning (default: '{STORY_PSEUDO_TARGET}' for the "
                        f"target '{STORY_TARGET}', else the first source, sorted)")
    k.add_argument("--tune-lambdas", default="0.1,0.3,1", metavar="X,...", help="lambda_max grid")
    k.add_argument("--tune-head-mults", default="1,10", metavar="X,...", help="head lr multiplier grid")
    k.add_argument("--tune-prompt-encoders", default="none,mlp,lstm", metavar="E,...",
                   help="prompt encoders tried on the PRADA variants")
    k.add_argument("--tune-lm-weights", default="0.3,1", metavar="W,...",
                   help="LM weight grid, judged on the cot-lm arm and reused by PRADA + LM")
    k.add_argument("--tune-source-drop", type=float, default=0.03, metavar="X",
                   help="a setting is chosen only if its source accuracy on the tuning split is at "
                        "most X below that of plain CoT (A) trained on the same split (the fair "
                        "test's aim for PRADA: within 0.03 of (A)); when none is, the one with the "
                        "best source accuracy is chosen, and the log says so. 1: no limit (the "
                        "pseudo-target's accuracy alone decides)")
    k.add_argument("--tune-seeds", default="100", metavar="S,...",
                   help="seeds of the tuning runs (kept apart from --seeds)")
    for name, text in (
            ("--report-only", "train nothing: build the report from the finished runs in --output-dir"),
            ("--blind", "keep the target's accuracy out of sight until every run is finished: "
                        "each run's line names its source accuracy only, and the report is "
                        "written only when no run of the plan is missing (a protocol fixed "
                        "before its numbers are seen; tuning lines name the pseudo-target's)"),
            ("--dry-run", "print the trainer command lines and exit"),
            ("--verbose", "show the trainer's output (always written to runs/.../seed<S>.log)")):
        e.add_argument(name, action="store_true", help=text)
    e.add_argument("--probe-folds", type=int, default=5, metavar="K",
                   help="folds of the cross-validated domain probes on pooled features")
    e.add_argument("--drop-weights", action="store_true",
                   help="once a run is finished and its record is written (pooled_features.pt: "
                        "the head's input features, each layer's domain share, the probes on "
                        "the head's rows), delete its final/ and checkpoints/ (~650 MB for the "
                        "pruned SmolLM2 student); the report and the reuse of finished runs need "
                        "only what stays (a few hundred KB), so an experiment's directory can be "
                        "copied to another machine and continued there. Keep the weights (the "
                        "default) to evaluate or analyse a run further")

    t = p.add_argument_group("training budget and data (passed to prada_fast/train.py)")
    add_run_flags(p, t, ("max_steps",), max_steps=dict(
        default=400, help="optimizer steps of every run (400, not the trainer's 1200: the default "
                          "comparison trains 16 runs, 21 minutes on 2 CPU cores)"))
    add_model_flags(p, t, ("teacher_steps",), teacher_steps=dict(
        default=200, help="steps of the auto teacher fit, once per seed and target (200, not the "
                          "trainer's 300: the fit is repeated per seed and target; cost below)"))
    add_data_flags(p, t, ("eval_per_domain",), eval_per_domain=dict(
        default=48, range=at_least(2),
        help="held-out records per domain: answer accuracy, PCA and probes (48, not the trainer's "
             "64: each of the many runs evaluates before and after training; at least 2, for the "
             "probes)"))
    add_run_flags(p, t, ("log_every",),
                  log_every=dict(help="steps between loss-curve points (metrics.jsonl)"))
    add_data_flags(p, t, ("data",), data=dict(
        help=f"trainer data spec, repeatable (default: {STORY_BENCHMARK}, the story benchmark, not "
             "the trainer's synthetic), e.g. data/gsm8k_train.jsonl#400; see train.py --help"))
    add_model_flags(p, t, ("student", "teacher", "teacher_fit_cache"), teacher_fit_cache=dict(
        help="folder of the fitted auto teachers (default: OUTPUT_DIR/teachers: the runs of a "
             "seed share one teacher)"))
    add_run_flags(p, t, ("ds",), ds=dict(
        default=None, help="DeepSpeed config passed to every run (default: none passed, so the "
                           "trainer's own default, ds_configs/zero3.json)"))
    add_run_flags(p, t, ("save_every",), save_every=dict(
        default=100, help="steps between each run's checkpoints: an interrupted run resumes from "
                          "its latest when the same command is run again (0: only the final one, "
                          "so an interrupted run starts afresh). A finished run keeps only its "
                          "final checkpoint; a checkpoint of the pruned SmolLM2 student takes "
                          "~650 MB and a few seconds"))
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per run: 1 runs `python prada_fast/train.py`; N > 1 the "
                        "deepspeed launcher with --num_gpus N (GPUs, or CPU ranks)")
    t.add_argument("--jobs", type=int, metavar="N",
                   help="runs trained at once, each its own process: the main runs, and the "
                        "tuning runs of one stage of --tune (the reference, the LM weights and "
                        "the adversaries' knobs; then each adversary's prompt encoders). "
                        "Default: 2 on a machine without CUDA with 2 "
                        "cores or more and --nproc 1 (one tiny run keeps ~1.2 of 2 cores busy: "
                        "two at once, one thread each, finished both in 1.2x the time of one "
                        "alone), else 1: on GPUs every run uses all of them")
    t.add_argument("--threads", type=int, metavar="N",
                   help="OMP_NUM_THREADS for each trainer process (default: the cores over "
                        "--jobs while runs train at once; unset, so that it uses every core, "
                        "for a run that trains alone: the run that fits an auto teacher, a "
                        "tuning run scored without others to train beside it, or any with "
                        "--jobs 1). "
                        "The trainer also gets OMP_WAIT_POLICY=PASSIVE unless it is set in the "
                        "environment")
    t.add_argument("--extra", default="", metavar="'FLAGS'",
                   help="more trainer flags, one quoted string, e.g. \"--max-len 512 --lr 1e-3\"")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_flags(argv, prepare=default_data)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: give distinct seeds")
    known = variants(args.prompt_len)
    try:
        args.tune_lambdas = [float(x) for x in args.tune_lambdas.split(",") if x.strip()]
        args.tune_head_mults = [float(x) for x in args.tune_head_mults.split(",") if x.strip()]
        args.tune_seeds = [int(x) for x in args.tune_seeds.split(",") if x.strip()]
        args.tune_lm_weights = [float(x) for x in args.tune_lm_weights.split(",") if x.strip()]
    except ValueError as e:
        p.error(f"--tune-lambdas/--tune-head-mults/--tune-seeds/--tune-lm-weights: {e}")
    args.tune_prompt_encoders = [x.strip() for x in args.tune_prompt_encoders.split(",") if x.strip()]
    if not (args.tune_lambdas and args.tune_head_mults and args.tune_seeds and args.tune_prompt_encoders
            and args.tune_lm_weights):
        p.error("--tune-*: give at least one value each")
    if (any(x < 0 for x in args.tune_lambdas) or any(x <= 0 for x in args.tune_head_mults)
            or any(not x >= 0 for x in args.tune_lm_weights)):
        p.error("--tune-lambdas and --tune-lm-weights must be >= 0 and --tune-head-mults > 0")
    bad_enc = [e for e in args.tune_prompt_encoders if e not in ("none", "mlp", "lstm")]
    if bad_enc:
        p.error(f"--tune-prompt-encoders: unknown {bad_enc}; choose from none, mlp, lstm")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in known]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(known)}")
    args.variants = [v for v in known if v in args.variants]  # canonical order
    if args.prompt_len <= 0 and any(known[v].has_prompt for v in args.variants):
        p.error("--prompt-len must be positive: it is what makes PRADA differ from the "
                "adversarial-only variants")
    try:
        args.extra = shlex.split(args.extra)
    except ValueError as e:
        p.error(f"--extra: {e}")
    owned = {"--output-dir", "--seed", "--max-steps", "--teacher-steps", "--target-domains",
             "--prompt-len", "--no-domain-loss", "--overwrite", "--resume", "--teacher-cache",
             "--teacher-fit-cache", "--source-domains", "--adversary", "--lambda-max",
             "--domain-head-lr-mult", "--domain-steps", "--prompt-encoder", "--lm-weight", "--teacher-seed",
             "--data-seed", "--save-every", "--keep-checkpoints"}
    clash = sorted({f.split("=")[0] for f in args.extra} & owned)
    if clash:
        p.error(f"--extra must not set {', '.join(clash)}: the comparison sets them")
    if args.jobs is None:
        args.jobs = default_jobs(args.nproc)
    args.targets = resolve_targets(args, p)
    args.output_dir = Path(args.output_dir).resolve()
    args.teacher_fit_cache = Path(args.teacher_fit_cache).resolve() if args.teacher_fit_cache else \
        args.output_dir / "teachers"
    return args


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_jobs(nproc: int) -> int:
    """2 runs at once on a CPU-only machine with 2 cores or more (one run of one process
    leaves cores idle), else 1 (on GPUs each run uses them all)."""
    import torch
    return 2 if nproc == 1 and not torch.cuda.is_available() and usable_cores() >= 2 else 1


def default_data(args) -> None:
    args.data = args.data or [STORY_BENCHMARK]


def data_domains(specs: list[str]) -> list[str]:
    """The domains the data specs hold (as the trainer will load them)."""
    from prada_fast.data import domains_of, load_spec
    records = []
    for spec in specs:
        records += load_spec(spec, skip_bad=True, seed=0)[0]
    return domains_of(records)


def resolve_targets(args, parser) -> list[str]:
    synthetic = all(s.startswith("synthetic") for s in args.data)
    if args.targets is None:
        if not synthetic:
            parser.error("--targets is required with non-synthetic --data (e.g. --targets aqua)")
        return [STORY_TARGET if args.data == [STORY_BENCHMARK] else SYNTHETIC_TARGET]
    names = list(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    if not names:
        parser.error("--targets: name at least one domain, or 'all'")
    if names == ["all"]:
        try:
            return data_domains(args.data)
        except Exception as e:  # DataError, a missing file ...
            parser.error(f"--data: {e}")
    return names  # the trainer checks that they are in the data
