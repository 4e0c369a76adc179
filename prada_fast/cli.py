"""Command-line flags of `prada_fast/train.py` (every flag is explained by --help)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .data import SYNTHETIC_TARGET
from .model import PRESETS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DS = REPO / "ds_configs" / "zero3.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    io.add_argument("--log-every", type=int, default=10, metavar="N",
                    help="steps between lines of metrics.jsonl")
    io.add_argument("--seed", type=int, default=0, help="seed of data order, init and synthetic data")
    io.add_argument("--no-progress", action="store_true", help="hide the progress bars")
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
                           "aqua*.json or strategyqa*.json; 'FORMAT:PATH[?key=value&...]' with "
                           "FORMAT gsm8k|aqua|strategyqa|jsonl|hf (jsonl/hf take question=, "
                           "rationale=, answer=, domain= or domain_field=; hf also split=); a "
                           "'#N' suffix keeps the first N records")
    data.add_argument("--source-domains", metavar="A,B",
                      help="labelled domains (default: every domain not named as a target)")
    data.add_argument("--target-domains", metavar="C",
                      help="unlabelled domains: they feed the domain loss only (default: "
                           f"'{SYNTHETIC_TARGET}' for synthetic data, none otherwise)")
    data.add_argument("--skip-bad", action="store_true",
                      help="skip malformed records (and report their count) instead of stopping")
    data.add_argument("--max-len", type=int, default=192, help="tokens per sequence")
    data.add_argument("--on-long", choices=("truncate", "refuse"), default="truncate",
                      help="sequences over --max-len: cut them (counted in the summary) or stop")
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
    model.add_argument("--teacher-cache", metavar="DIR",
                       help="cache of fitted teachers (default: $PRADA_FAST_CACHE/teachers or "
                            "~/.cache/prada_fast/teachers)")
    model.add_argument("--prompt-len", type=int, default=8, metavar="K",
                       help="learned soft-prompt vectors before the input (0: none)")
    model.add_argument("--domain-head", choices=("linear", "mlp"), default="linear",
                       help="domain classifier on pooled hidden states (linear runs in the fused op)")
    model.add_argument("--mlp-hidden", type=int, default=0, help="width of the MLP head (0: H)")
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
    obj.add_argument("--grl-schedule", choices=("dann", "constant"), default="dann",
                     help="lambda schedule of the gradient reversal")
    obj.add_argument("--lambda-max", type=float, default=1.0, help="largest GRL scale")
    obj.add_argument("--grl-gamma", type=float, default=10.0, help="gamma of the DANN schedule")
    obj.add_argument("--lr", type=float, help="override the optimizer lr of the DeepSpeed config")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--max-new-tokens", type=int, default=80, help="greedy decoding budget")
    ev.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generate call")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.data = args.data or ["synthetic"]
    for flag in ("max_steps", "max_len", "teacher_steps"):
        if getattr(args, flag) <= 0:
            build_parser().error(f"--{flag.replace('_', '-')} must be positive")
    if args.resume and args.overwrite:
        build_parser().error("--resume and --overwrite exclude each other")
    return args
