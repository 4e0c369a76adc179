"""The trainer's flags (an argparse namespace, trainer/flags.py) turned into the settings
each stage takes: below the entry points no module reads a flag's name."""
from __future__ import annotations

import argparse
import sys

from prada_fast.data.prepare import DataSettings, load_run_data
from prada_fast.teacher.resolve import TeacherSpec
from prada_fast.trainer.loop import LoopSettings


def data_settings(args) -> DataSettings:
    return DataSettings(specs=tuple(args.data), source_domains=args.source_domains,
                        target_domains=args.target_domains, skip_bad=args.skip_bad,
                        eval_per_domain=args.eval_per_domain, seed=seed_of(args, "data_seed"))


def teacher_spec(args) -> TeacherSpec:
    return TeacherSpec(name=args.teacher, steps=args.teacher_steps, lr=args.teacher_lr,
                       seed=seed_of(args, "teacher_seed"), fit_cache=args.teacher_fit_cache)


def seed_of(args, dest: str) -> int:
    """--data-seed or --teacher-seed, --seed where unset (or absent: an older run_config.json)."""
    value = getattr(args, dest, None)
    return args.seed if value is None else value


def loop_settings(args) -> LoopSettings:
    inject = frozenset(int(s) for s in args.inject_nan.split(",") if s) if args.inject_nan else frozenset()
    return LoopSettings(
        max_steps=args.max_steps, stop_after=args.stop_after, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        probe_every=args.probe_every, max_bad_steps=args.max_bad_steps, inject_nan=inject,
        show_progress=not args.no_progress, tensorboard=args.report_to == "tensorboard",
        alpha=args.alpha, temperature=args.temperature, use_domain=not args.no_domain_loss,
        lm_weight=args.lm_weight,
        adversary=args.adversary, lambda_schedule=args.lambda_schedule, lambda_max=args.lambda_max,
        lambda_gamma=args.lambda_gamma)


# How the held-out split groups records (data.prepare.hold_out), recorded in run_config.json:
# a run without it held out records, not questions, so its held-out set cannot be rebuilt.
HELD_OUT_BY = "question"


def run_config(args) -> dict:
    """What DIR/run_config.json records: every flag but the launcher's --local_rank, and
    how the held-out split was made (`held_out_by`)."""
    return {**{k: v for k, v in vars(args).items() if k != "local_rank"}, "held_out_by": HELD_OUT_BY}


def held_out_records(run_config: dict, where: str = "the run"):
    """The held-out records of a finished run, exactly as the trainer chose them (from its
    run_config.json): (records, domains, the run's flags as a namespace). A run from before
    questions were held out whole is warned about: today's split is not the one it used."""
    if run_config.get("held_out_by") != HELD_OUT_BY:
        print(f"warning: {where} was trained before a held-out question was held out whole (no "
              "held_out_by in its run_config.json): its held-out records are rebuilt by today's "
              "rule, so some of them may have been its training records", file=sys.stderr)
    args = argparse.Namespace(**run_config)
    data = load_run_data(data_settings(args))
    return data.eval_records, data.domains, args
