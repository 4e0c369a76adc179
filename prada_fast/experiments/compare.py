"""PRADA against plain chain-of-thought distillation: same steps, data and seeds.

    python -m prada_fast.experiments.compare                     # synthetic, CPU
    python -m prada_fast.experiments.compare --tune --seeds 0,1,2,3,4 \\
        --data synthetic:400:shopping,travel,recipes,garden --targets all   # the full protocol
    python -m prada_fast.experiments.compare --data data/gsm8k_train.jsonl#400 \\
        --data data/strategyqa_train.json#400 --data data/aqua_dev.json \\
        --targets aqua --extra "--max-len 512"

Five variants are trained by `prada_fast/train.py`, one subprocess per (target, variant,
seed), leave-one-domain-out (the target domain is unlabelled, every other domain is a
labelled source):

  cot              (a) plain CoT distillation:       --prompt-len 0 --no-domain-loss
  grl              (b) adversarial only, GRL:        --prompt-len 0 --adversary grl
  confusion        (c) adversarial only, confusion:  --prompt-len 0 --adversary confusion
  prada-grl        (d) PRADA, GRL:                   --prompt-len K --adversary grl
  prada-confusion  (e) PRADA, confusion:             --prompt-len K --adversary confusion

The adversarial variants also get --lambda-max, --domain-head-lr-mult and (PRADA) the
prompt encoder: given as flags, or chosen per target by --tune on a pseudo-target split of
the sources, never on the target's records. The report gives per variant the mean over
seeds and the paired difference against (a) with its 95 % t-interval.

Runs of the same seed share one teacher cache, so a seed's teacher is fitted once and every
variant of that seed distils from the same teacher, in the same data order. Finished runs
(summary.json present) are reused: rerunning the same command continues an interrupted
experiment. The report goes to OUTPUT_DIR/report.md and report.json, with PNG plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prada_fast.data import SYNTHETIC_TARGET
from prada_fast.data.synthetic import STORY_BENCHMARK, STORY_PSEUDO_TARGET, STORY_TARGET
from prada_fast.common.distributed import launch_cmd
from prada_fast.common.envinfo import machine, versions

from .analysis import aggregate, load_metrics, mean_curves, pca_2d, pooled_features, probe_accuracy

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    short: str
    flags: tuple[str, ...]
    trains_domain_head: bool
    has_prompt: bool = False


ADVERSARIES = ("grl", "confusion")


VARIANT_KEYS = ("cot", "grl", "confusion", "prada-grl", "prada-confusion")


def variants(prompt_len: int) -> dict[str, Variant]:
    """The compared trainer configurations. The knobs the protocol chooses (lambda_max, the
    head's lr multiplier, the prompt encoder) are added by `knob_flags`."""
    out = {"cot": Variant("cot", "(a) plain CoT distillation", "(a) CoT-KD",
                          ("--prompt-len", "0", "--no-domain-loss"), False)}
    for i, adv in enumerate(ADVERSARIES):
        out[adv] = Variant(adv, f"({'bc'[i]}) adversarial only ({adv})", f"({'bc'[i]}) {adv}",
                           ("--prompt-len", "0", "--adversary", adv), True)
    for i, adv in enumerate(ADVERSARIES):
        out[f"prada-{adv}"] = Variant(
            f"prada-{adv}", f"({'de'[i]}) PRADA (soft prompt K={prompt_len} + {adv})",
            f"({'de'[i]}) PRADA {adv}", ("--prompt-len", str(prompt_len), "--adversary", adv),
            True, True)
    return out


def knob_flags(v: Variant, knobs: dict) -> list[str]:
    """Trainer flags of the chosen knobs that apply to variant v."""
    if not v.trains_domain_head:
        return []
    a = ["--lambda-max", str(knobs["lambda_max"]), "--domain-head-lr-mult", str(knobs["head_lr_mult"])]
    if v.has_prompt:
        a += ["--prompt-encoder", knobs["prompt_encoder"]]
    return a


# ----------------------------------------------------------------------------- flags


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, "") or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


EPILOG = """\
layout of --output-dir:
  runs/<target>/<variant>/seed<S>/   one trainer run (metrics.jsonl, summary.json, final/,
                                     pooled_features.pt, compare_run.json)
  runs/<target>/<variant>/seed<S>.log  its console output
  teachers/                          the auto teachers, one per (seed, target), shared by variants
  report.md, report.json, pca_<target>.png, loss_curves_<target>.png

cost (tiny student, batch 16, 2 CPU cores): idle cores ~6.5 optimizer steps/s, teacher fit
~3.5 steps/s, ~25 s per run for start-up, evaluation before/after, export and features:
default (1 target x 3 seeds x 5 variants, 400 steps; 3 teacher fits of 200 steps)
15 x (62 + 25) s + 3 x 57 s = ~25 min (an estimate from the rates measured on 2026-11-25).
On cores shared with other jobs it is several times that: on 2026-12-01, with tests running
beside it, one 400-step run took ~20 min. --tune adds its tuning runs (with the default
grid: 1 + 2 x 6 + 2 x 3 = 19 per tuning seed).
--targets all: x the number of domains. Interrupted? Run the same command again: finished runs are reused.
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prada_fast.experiments.compare",
        description="Train plain CoT distillation, the two adversaries alone and PRADA with each, "
                    "with the same steps, data and seeds, leave-one-domain-out, and write a report "
                    "(report.md, report.json, PNG plots) under --output-dir. Default: the story "
                    f"benchmark ({STORY_BENCHMARK}, target '{STORY_TARGET}') on the CPU, 5 variants "
                    "x 3 seeds: about 25 minutes on 2 idle CPU cores (estimated, see below).",
        epilog=EPILOG, formatter_class=_Help)
    e = p.add_argument_group("experiment")
    e.add_argument("--output-dir", default="runs/compare", metavar="DIR",
                   help="where the runs, teachers, report and plots go (layout below)")
    e.add_argument("--seeds", default="0,1,2", metavar="S,S,...",
                   help="seeds; each seed fixes the data, the data order, the initialisation "
                        "and the auto teacher, shared by every variant")
    e.add_argument("--targets", metavar="DOM,...|all",
                   help="held-out (unlabelled) target domain(s), one leave-one-domain-out "
                        "experiment each; 'all' rotates over every domain of the data (cost: "
                        f"x number of domains). Default: '{STORY_TARGET}' for the default data, "
                        f"'{SYNTHETIC_TARGET}' for other synthetic data; "
                        "required with other data")
    e.add_argument("--variants", default=",".join(VARIANT_KEYS), metavar="V,...",
                   help="which of " + ", ".join(VARIANT_KEYS) + " to train")
    e.add_argument("--prompt-len", type=int, default=8, metavar="K",
                   help="soft-prompt length of the PRADA variants; the others use 0")

    k = p.add_argument_group(
        "the protocol's knobs",
        "lambda_max, the head's lr multiplier and the prompt encoder, given here or chosen by "
        "--tune on the source domains alone: one source is held out as a pseudo-target (its "
        "records unlabelled, the real target's records absent) and each setting is judged by "
        "the pseudo-target's answer accuracy (mean over --tune-seeds; ties: source accuracy). "
        "The adversary's knobs are chosen on the adversarial-only variant and reused by PRADA "
        "with that adversary; then the prompt encoder is chosen on the PRADA variant. The real "
        "target's records are never looked at before the main runs.")
    k.add_argument("--lambda-max", type=float, default=1.0, help="largest adversarial scale")
    k.add_argument("--head-lr-mult", type=float, default=10.0, metavar="X",
                   help="the domain head's lr over the student's (trainer: --domain-head-lr-mult)")
    k.add_argument("--prompt-encoder", choices=("none", "mlp", "lstm"), default="none",
                   help="P-tuning encoder of the PRADA variants' soft prompt")
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
    k.add_argument("--tune-seeds", default="100", metavar="S,...",
                   help="seeds of the tuning runs (kept apart from --seeds)")
    e.add_argument("--report-only", action="store_true",
                   help="train nothing: build the report from the finished runs in --output-dir")
    e.add_argument("--dry-run", action="store_true",
                   help="print the trainer command lines and exit")
    e.add_argument("--verbose", action="store_true",
                   help="show the trainer's output (always written to runs/.../seed<S>.log)")
    e.add_argument("--probe-folds", type=int, default=5, metavar="K",
                   help="folds of the cross-validated domain probes on pooled features")

    t = p.add_argument_group("training budget and data (passed to prada_fast/train.py)")
    t.add_argument("--max-steps", type=int, default=400, help="optimizer steps of every run")
    t.add_argument("--teacher-steps", type=int, default=200,
                   help="steps of the auto teacher fit (once per seed and target)")
    t.add_argument("--eval-per-domain", type=int, default=48, metavar="N",
                   help="held-out records per domain: answer accuracy, PCA and probes")
    t.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="steps between loss-curve points (metrics.jsonl)")
    t.add_argument("--data", action="append", metavar="SPEC",
                   help=f"trainer data spec, repeatable (default: {STORY_BENCHMARK}, the story "
                        "benchmark), e.g. "
                        "data/gsm8k_train.jsonl#400; see train.py --help")
    t.add_argument("--student", default="tiny", metavar="NAME|DIR", help="student preset or HF dir")
    t.add_argument("--teacher", default="auto", metavar="auto|none|NAME|DIR",
                   help="teacher; auto fits the tiny teacher for a preset student")
    t.add_argument("--teacher-cache", metavar="DIR",
                   help="cache of fitted teachers (default: OUTPUT_DIR/teachers)")
    t.add_argument("--ds", metavar="JSON", help="DeepSpeed config (default: the trainer's zero3.json)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes per run: 1 runs `python prada_fast/train.py`; N > 1 the "
                        "deepspeed launcher with --num_gpus N (GPUs, or CPU ranks)")
    t.add_argument("--threads", type=int, metavar="N",
                   help="OMP_NUM_THREADS for the trainer (default: unset, so one process "
                        "uses every core). The trainer also gets OMP_WAIT_POLICY=PASSIVE unless "
                        "it is set in the environment")
    t.add_argument("--extra", default="", metavar="'FLAGS'",
                   help="more trainer flags, one quoted string, e.g. \"--max-len 512 --lr 1e-3\"")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.data = args.data or [STORY_BENCHMARK]
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
    except ValueError as e:
        p.error(f"--tune-lambdas/--tune-head-mults/--tune-seeds: {e}")
    args.tune_prompt_encoders = [x.strip() for x in args.tune_prompt_encoders.split(",") if x.strip()]
    if not (args.tune_lambdas and args.tune_head_mults and args.tune_seeds and args.tune_prompt_encoders):
        p.error("--tune-*: give at least one value each")
    if any(x < 0 for x in args.tune_lambdas) or any(x <= 0 for x in args.tune_head_mults):
        p.error("--tune-lambdas must be >= 0 and --tune-head-mults > 0")
    bad_enc = [e for e in args.tune_prompt_encoders if e not in ("none", "mlp", "lstm")]
    if bad_enc:
        p.error(f"--tune-prompt-encoders: unknown {bad_enc}; choose from none, mlp, lstm")
    if args.lambda_max < 0 or args.head_lr_mult <= 0:
        p.error("--lambda-max must be >= 0 and --head-lr-mult > 0")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in known]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(known)}")
    args.variants = [v for v in known if v in args.variants]  # canonical order
    for flag in ("max_steps", "teacher_steps", "log_every", "nproc", "probe_folds"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.eval_per_domain < 2:
        p.error("--eval-per-domain must be at least 2 (accuracy, PCA and probes use them)")
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
             "--domain-head-lr-mult", "--prompt-encoder"}
    clash = sorted({f.split("=")[0] for f in args.extra} & owned)
    if clash:
        p.error(f"--extra must not set {', '.join(clash)}: the comparison sets them")
    args.targets = resolve_targets(args, p)
    args.output_dir = Path(args.output_dir).resolve()
    args.teacher_cache = Path(args.teacher_cache).resolve() if args.teacher_cache else \
        args.output_dir / "teachers"
    return args


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


# ----------------------------------------------------------------------------- runs


def run_dir(args, target: str, variant: str, seed: int) -> Path:
    return args.output_dir / "runs" / target / variant / f"seed{seed}"


def default_knobs(args) -> dict:
    return {"lambda_max": args.lambda_max, "head_lr_mult": args.head_lr_mult,
            "prompt_encoder": args.prompt_encoder}


def trainer_args(args, target: str, v: Variant, seed: int, knobs: dict | None = None, *,
                 sources: list[str] | None = None, out: Path | None = None) -> list[str]:
    """The trainer flags of one run (without the launcher and script). sources: keep only
    these labelled domains and `target` (the tuning runs' pseudo-target split)."""
    out = out or run_dir(args, target, v.key, seed)
    a = ["--output-dir", str(out), "--seed", str(seed),
         "--max-steps", str(args.max_steps), "--teacher-steps", str(args.teacher_steps),
         "--eval-per-domain", str(args.eval_per_domain), "--log-every", str(args.log_every),
         "--target-domains", target, "--student", args.student, "--teacher", args.teacher,
         "--teacher-fit-cache", str(args.teacher_cache), "--save-every", "0", "--no-progress"]
    if sources:
        a += ["--source-domains", ",".join(sources)]
    if args.ds:
        a += ["--ds", args.ds]
    for spec in args.data:
        a += ["--data", spec]
    return a + list(v.flags) + knob_flags(v, knobs or default_knobs(args)) + list(args.extra)


def launcher(args) -> list[str]:
    return launch_cmd(TRAIN_SCRIPT, args.nproc)


def trainer_env(args) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # Idle OpenMP threads sleep instead of spinning: on cores shared with other jobs, spinning
    # made the tiny models' steps ~10x slower (measured: 5.5 s vs 0.49 s per teacher step).
    # Export OMP_WAIT_POLICY yourself to override.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


SIDECAR = "compare_run.json"
FEATURES = "pooled_features.pt"


def finished(d: Path) -> bool:
    return (d / "summary.json").is_file() and (d / "final" / "prada_config.json").is_file()


def _comparable(argv: list[str]) -> list[str]:
    """Trainer flags without the paths (so that a moved experiment directory still matches)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--output-dir", "--teacher-fit-cache", "--teacher-cache"):
            skip = True
        else:
            out.append(a)
    return out


def check_reusable(d: Path, argv: list[str]) -> None:
    side = d / SIDECAR
    if side.is_file():
        old = json.loads(side.read_text()).get("trainer_args")
        if old is not None and _comparable(old) != _comparable(argv):
            raise SystemExit(
                f"error: {d} holds a finished run made with other trainer flags:\n  {shlex.join(old)}\n"
                f"this experiment wants:\n  {shlex.join(argv)}\n"
                "use another --output-dir, or delete that run directory to redo it")


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def train_one(args, argv: list[str], log_path: Path) -> float:
    cmd = launcher(args) + argv + ["--overwrite"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=trainer_env(args), text=True, bufsize=1)
        try:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()  # the log can be followed while the run trains
                if args.verbose:
                    sys.stdout.write(line)
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise SystemExit(f"error: the trainer exited with {code}; its log: {log_path}\n"
                         + "\n".join(tail))
    return time.time() - t0


def features_of(d: Path) -> dict:
    """The run's pooled held-out features, computed once and cached in the run directory."""
    path = d / FEATURES
    if path.is_file() and path.stat().st_mtime >= (d / "summary.json").stat().st_mtime:
        return torch.load(path)
    feats, labels, domains, roles = pooled_features(d)
    out = {"features": feats, "labels": labels, "domains": domains, "roles": roles}
    torch.save(out, path)
    return out


def ensure_run(args, argv: list[str], d: Path, tag: str, walls: list[float]) -> tuple[str, float | None]:
    """Train the run of `argv` into d, or reuse it when finished with the same flags.
    Returns (status "trained" | "reused" | "missing", wall seconds of this training)."""
    if finished(d):
        check_reusable(d, argv)
        log(f"{tag}: finished run found, reused")
        return "reused", None
    if args.report_only:
        log(f"{tag}: missing, skipped (--report-only)")
        return "missing", None
    eta = f" (recent runs took {_mean(walls[-5:]):.0f} s)" if walls else ""
    log(f"{tag}: training{eta}; log: {d.relative_to(args.output_dir)}.log")
    wall = train_one(args, argv, d.with_name(d.name + ".log"))
    walls.append(wall)
    (d / SIDECAR).write_text(json.dumps({"trainer_args": argv, "wall_seconds": round(wall, 1)},
                                        indent=2) + "\n")
    return "trained", wall


def collect_run(args, target: str, v: Variant, seed: int, status: str, wall: float | None) -> dict:
    d = run_dir(args, target, v.key, seed)
    summary = json.loads((d / "summary.json").read_text())
    rows = load_metrics(d)
    last = rows[-1] if rows else {}
    side = d / SIDECAR
    if wall is None and side.is_file():
        wall = json.loads(side.read_text()).get("wall_seconds")
    feats = features_of(d)
    x, y = feats["features"], feats["labels"]
    return {
        "target": target, "variant": v.key, "seed": seed,
        "dir": str(d.relative_to(args.output_dir)), "status": status,
        "wall_seconds": wall if wall is not None else summary.get("wall_seconds"),
        "trainer_wall_seconds": summary.get("wall_seconds"),
        "steps": summary.get("steps"), "tokens_per_s": summary.get("tokens_per_s"),
        "roles": {k: s["role"] for k, s in summary["domains"].items()},
        "accuracy_after": {k: s["accuracy_after"] for k, s in summary["domains"].items()},
        "accuracy_before": {k: s["accuracy_before"] for k, s in summary["domains"].items()},
        "domain_classifier_accuracy": summary.get("domain_classifier_accuracy"),
        "domain_classifier_accuracy_before": summary.get("domain_classifier_accuracy_before"),
        "final_loss": summary.get("final_loss"),
        "final": {k: last.get(k) for k in ("ce", "kd", "dom", "dom_acc", "grl_lambda")},
        "probe_accuracy": probe_accuracy(x, y, kind="logistic", folds=args.probe_folds),
        "ncm_accuracy": probe_accuracy(x, y, kind="ncm", folds=args.probe_folds),
        "n_probe": int(len(y)),
    }


# ----------------------------------------------------------------------------- tuning


def _tag(knobs: dict, v: Variant) -> str:
    tag = f"lam{knobs['lambda_max']:g}-mult{knobs['head_lr_mult']:g}" if v.trains_domain_head else "base"
    return tag + (f"-enc{knobs['prompt_encoder']}" if v.has_prompt else "")


def tune_split(args, target: str) -> tuple[str, list[str]]:
    """(pseudo-target, the remaining sources) for a target: the real target is left out."""
    sources = [d for d in data_domains(args.data) if d != target]
    pseudo = args.pseudo_target or (STORY_PSEUDO_TARGET if target == STORY_TARGET and
                                    STORY_PSEUDO_TARGET in sources else sorted(sources)[0])
    if pseudo not in sources:
        raise SystemExit(f"error: --pseudo-target {pseudo}: not one of the sources {sources}")
    rest = [d for d in sources if d != pseudo]
    if not rest:
        raise SystemExit(f"error: tuning for target {target} needs two sources or more")
    return pseudo, rest


def tune(args, target: str, walls: list[float]) -> dict[str, dict]:
    """The knobs of each variant for `target`, chosen on a pseudo-target (see --tune's
    help). Writes OUTPUT_DIR/tune/<target>/chosen.json with every setting's scores."""
    V = variants(args.prompt_len)
    out = args.output_dir / "tune" / target / "chosen.json"
    if args.report_only and out.is_file():  # the choice already made; nothing retrained
        saved = json.loads(out.read_text())["chosen"]
        return {k: saved.get(k, default_knobs(args)) for k in args.variants}
    pseudo, rest = tune_split(args, target)
    table = []

    def score(v: Variant, knobs: dict) -> tuple[float, float]:
        pa, sa = [], []
        for seed in args.tune_seeds:
            d = args.output_dir / "tune" / target / v.key / _tag(knobs, v) / f"seed{seed}"
            argv = trainer_args(args, pseudo, v, seed, knobs, sources=rest, out=d)
            status, _ = ensure_run(args, argv, d, f"tune target={target} (pseudo {pseudo}) {v.key} "
                                   f"{_tag(knobs, v)} seed={seed}", walls)
            if status == "missing":
                continue
            acc = {k: x["accuracy_after"] for k, x in
                   json.loads((d / "summary.json").read_text())["domains"].items()}
            pa.append(acc[pseudo])
            sa.append(_mean([acc[x] for x in rest]))
        row = {"variant": v.key, "knobs": knobs if v.trains_domain_head else None,
               "pseudo_target_accuracy": _mean(pa), "source_accuracy": _mean(sa), "n_seeds": len(pa)}
        table.append(row)
        log(f"tune target={target} {v.key} {_tag(knobs, v)}: pseudo-target {pseudo} "
            f"{_f(row['pseudo_target_accuracy'])}, sources {_f(row['source_accuracy'])}")
        return (row["pseudo_target_accuracy"] or 0.0, row["source_accuracy"] or 0.0)

    chosen = {k: default_knobs(args) for k in args.variants}
    if "cot" in args.variants:
        score(V["cot"], default_knobs(args))  # the reference on the same split
    for adv in ADVERSARIES:
        wanted = [k for k in (adv, f"prada-{adv}") if k in args.variants]
        if not wanted:
            continue
        grid = [{"lambda_max": lam, "head_lr_mult": mult, "prompt_encoder": "none"}
                for lam in args.tune_lambdas for mult in args.tune_head_mults]
        # first best on ties (grid order); a single candidate is chosen without a run
        best = max(grid, key=lambda kn: score(V[adv], kn)) if len(grid) > 1 else grid[0]
        chosen[adv] = best
        if f"prada-{adv}" in args.variants:
            encs = [{**best, "prompt_encoder": e} for e in args.tune_prompt_encoders]
            chosen[f"prada-{adv}"] = (max(encs, key=lambda kn: score(V[f"prada-{adv}"], kn))
                                      if len(encs) > 1 else encs[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "pseudo_target": pseudo, "sources": rest,
                               "seeds": args.tune_seeds, "chosen": chosen, "tried": table},
                              indent=2) + "\n")
    log(f"tune target={target}: chosen " + "; ".join(
        f"{k} {_tag(kn, V[k])}" for k, kn in chosen.items() if V[k].trains_domain_head))
    return chosen


# ----------------------------------------------------------------------------- aggregation


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(runs: list[dict], v: Variant) -> dict:
    """One variant of one target over its seeds."""
    roles = runs[0]["roles"]
    out = {"label": v.label, "seeds": [r["seed"] for r in runs], "domains": {},
           "domain_head_trained": v.trains_domain_head}
    for d, role in roles.items():
        out["domains"][d] = {
            "role": role,
            "accuracy_after": aggregate(r["accuracy_after"].get(d) for r in runs),
            "accuracy_before": aggregate(r["accuracy_before"].get(d) for r in runs)}
    src = [d for d, role in roles.items() if role == "source"]
    tgt = [d for d, role in roles.items() if role == "target"]
    out["source_accuracy_after"] = aggregate(_mean([r["accuracy_after"][d] for d in src]) for r in runs)
    out["target_accuracy_after"] = aggregate(_mean([r["accuracy_after"][d] for d in tgt]) for r in runs)
    out["all_accuracy_before"] = aggregate(_mean(list(r["accuracy_before"].values())) for r in runs)
    for key in ("domain_classifier_accuracy", "probe_accuracy", "ncm_accuracy", "final_loss",
                "wall_seconds", "tokens_per_s"):
        out[key] = aggregate(r[key] for r in runs)
    for key in ("ce", "kd", "dom", "dom_acc"):
        out[f"final_{key}"] = aggregate(r["final"].get(key) for r in runs)
    return out


def paired_differences(by_variant: dict[str, list[dict]], base: str = "cot") -> dict:
    """Per seed, variant minus the base variant (same seed = same teacher, data and order)."""
    if base not in by_variant:
        return {}
    base_runs = {r["seed"]: r for r in by_variant[base]}
    out = {}
    for key, runs in by_variant.items():
        if key == base:
            continue
        diffs = {"source_accuracy_after": [], "target_accuracy_after": [], "probe_accuracy": []}
        for r in runs:
            b = base_runs.get(r["seed"])
            if b is None:
                continue
            for name, fn in (("source_accuracy_after", lambda x: _mean(
                                 [x["accuracy_after"][d] for d, ro in x["roles"].items() if ro == "source"])),
                             ("target_accuracy_after", lambda x: _mean(
                                 [x["accuracy_after"][d] for d, ro in x["roles"].items() if ro == "target"])),
                             ("probe_accuracy", lambda x: x["probe_accuracy"])):
                a, c = fn(r), fn(b)
                if a is not None and c is not None:
                    diffs[name].append(a - c)
        out[key] = {k: {**aggregate(v), "ci95": ci95(v)} for k, v in diffs.items()}
    return out


# two-sided 97.5 % quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(values) -> list[float] | None:
    """The 95 % t-interval of the mean of paired differences (None below 2 values)."""
    a = aggregate(values)
    if a["n"] < 2:
        return None
    t = T975[a["n"] - 2] if a["n"] - 1 <= len(T975) else 1.96
    half = t * a["std"] / math.sqrt(a["n"])
    return [a["mean"] - half, a["mean"] + half]


# ----------------------------------------------------------------------------- report


def fmt(a: dict | None, digits: int = 3) -> str:
    if not a or a.get("mean") is None:
        return "–"
    if a["n"] == 1:
        return f"{a['mean']:.{digits}f}"
    return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"


def write_markdown(report: dict, path: Path) -> None:
    cfg = report["config"]
    L = ["# PRADA vs plain CoT distillation", "",
         f"Generated by `prada_fast.experiments.compare` on {report['finished_at']} "
         f"({report['machine']['cpu_count']} CPU cores"
         + (f", {report['machine']['gpu']}" if report["machine"]["gpu"] else "") + ").", "",
         "```bash", report["command"], "```", "",
         f"- data: {', '.join(cfg['data'])}; student `{cfg['student']}`, teacher `{cfg['teacher']}`",
         f"- budget per run: {cfg['max_steps']} optimizer steps, auto-teacher fit "
         f"{cfg['teacher_steps']} steps (once per seed and target), "
         f"{cfg['eval_per_domain']} held-out records per domain",
         f"- seeds: {', '.join(map(str, cfg['seeds']))}; mean ± sample std (n − 1) over seeds",
         f"- runs: {report['n_runs_done']} of {report['n_runs_planned']} finished "
         f"({report['n_runs_trained']} trained in this invocation); wall time of this "
         f"invocation {report['wall_seconds'] / 60:.1f} min, summed run time "
         f"{report['run_seconds_total'] / 60:.1f} min (teacher fits included: "
         + (", ".join(f"{t['seconds']:.0f} s" for t in report["teacher_fits"]) or "none") + ")", ""]
    if report["n_runs_done"] < report["n_runs_planned"]:
        L += ["**Incomplete: rerun the same command to finish the missing runs.**", ""]
    for target, res in report["results"].items():
        vs = res["variants"]
        keys = list(vs)
        if not keys:
            continue
        D = res["n_domains"]
        first = vs[keys[0]]
        sources = [d for d, x in first["domains"].items() if x["role"] == "source"]
        L += [f"## Target domain `{target}` (unlabelled); sources: {', '.join(sources)}", ""]
        tuned = report.get("tuning", {}).get(target)
        if tuned:
            L += [f"### Knobs chosen on the pseudo-target `{tuned['pseudo_target']}` (sources "
                  f"{', '.join(tuned['sources'])}, `{target}` absent; seeds "
                  f"{', '.join(map(str, tuned['seeds']))})", "",
                  "| variant | lambda_max | head lr mult | prompt encoder | pseudo-target acc "
                  "| source acc | chosen |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for row in tuned["tried"]:
                kn = row["knobs"] or {}
                pick = kn and tuned["chosen"].get(row["variant"]) == kn
                L.append(f"| {row['variant']} | {kn.get('lambda_max', '–')} | "
                         f"{kn.get('head_lr_mult', '–')} | "
                         f"{kn.get('prompt_encoder', '–') if row['variant'].startswith('prada') else '–'} | "
                         f"{_f(row['pseudo_target_accuracy'])} | {_f(row['source_accuracy'])} | "
                         f"{'**yes**' if pick else ''} |")
            L.append("")
        L += [
              "### Answer accuracy after training (held-out, greedy decoding)", "",
              "| domain | role | " + " | ".join(vs[k]["label"] for k in keys) + " |",
              "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
        for d, x in first["domains"].items():
            L.append(f"| {d} | {x['role']} | "
                     + " | ".join(fmt(vs[k]["domains"][d]["accuracy_after"]) for k in keys) + " |")
        L.append("| **sources (mean)** | source | "
                 + " | ".join(fmt(vs[k]["source_accuracy_after"]) for k in keys) + " |")
        L.append(f"| **target** `{target}` | target | "
                 + " | ".join(fmt(vs[k]["target_accuracy_after"]) for k in keys) + " |")
        L.append("| all domains, before training | | "
                 + " | ".join(fmt(vs[k]["all_accuracy_before"]) for k in keys) + " |")
        L.append("")
        if res.get("paired_vs_cot"):
            L += ["Paired per-seed differences against (a) (same seed: same teacher, data and "
                  "order): mean ± std [95 % t-interval]:", "",
                  "| variant | Δ target acc | Δ source acc | Δ probe acc |", "| --- | --- | --- | --- |"]
            for k, dd in res["paired_vs_cot"].items():
                L.append(f"| {vs[k]['label']} | " + " | ".join(
                    fmt(dd[m]) + (f" [{dd[m]['ci95'][0]:+.3f}, {dd[m]['ci95'][1]:+.3f}]"
                                  if dd[m].get("ci95") else "")
                    for m in ("target_accuracy_after", "source_accuracy_after", "probe_accuracy")) + " |")
            L.append("")
        L += [f"### Domain separability of the pooled student features (D = {D}, chance {1 / D:.3f})", "",
              "| variant | domain head acc | fresh logistic probe acc | nearest-mean probe acc "
              f"| final L_dom (ln D = {math.log(D):.3f}) | final CE | final KD | final loss "
              "| run wall (s)¹ |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k in keys:
            x = vs[k]
            head = fmt(x["domain_classifier_accuracy"]) if x["domain_head_trained"] else \
                f"({fmt(x['domain_classifier_accuracy'])}, head untrained)"
            dom = fmt(x["final_dom"]) if x["domain_head_trained"] else "– (no domain loss)"
            L.append(f"| {x['label']} | {head} | {fmt(x['probe_accuracy'])} | {fmt(x['ncm_accuracy'])} "
                     f"| {dom} | {fmt(x['final_ce'])} | {fmt(x['final_kd'])} | {fmt(x['final_loss'])} "
                     f"| {fmt(x['wall_seconds'], 0)} |")
        L += ["", "¹ the first run of each seed to need its teacher also fitted it (in one invocation "
              f"that is {vs[keys[0]]['label']}; the fit times are listed above).", ""]
        plots = report["plots"].get(target, {})
        if plots.get("pca"):
            L += [f"### Pooled student features, PCA (seed {plots['pca_seed']}, held-out records)", "",
                  f"![PCA of pooled features]({plots['pca']})", ""]
        if plots.get("loss_curves"):
            L += ["### Loss curves (mean over seeds, band ±1 std)", "",
                  f"![loss curves]({plots['loss_curves']})", ""]
    L += ["## How to read these numbers", "",
          "- Accuracy: fraction of the held-out records of a domain whose greedy completion states "
          "the gold answer after \"The answer is\"; with N held-out records per domain its "
          "resolution is 1/N.",
          "- Domain head acc: the run's own domain classifier (summary.json) on the held-out "
          "records. Under the gradient reversal the student is trained to *fool* it, so a value at "
          "or below chance does not by itself mean domain-invariant features: the head may be "
          "confidently wrong on features that still separate the domains. Variant (a) never "
          "trains its head (no domain loss): its value is that of a random head.",
          "- Fresh probes: a logistic-regression and a nearest-class-mean classifier fitted on "
          "the pooled features of the held-out records (stratified cross-validation). They measure "
          "how much domain information the features still carry, whatever the head learned. "
          "The features are the final hidden states averaged over each record's question tokens "
          "(the domain head's input, `--pool question`); the question comes first and attention is "
          "causal, so a source record's rationale and answer do not reach them.",
          "- final loss is the task loss plus L_dom, and (a) has no L_dom: compare the variants' "
          "task fit by final CE and KD.",
          "- final L_dom compared with ln D: the domain cross-entropy at chance; far above it means "
          "the head is confidently wrong, not confused.", ""]
    path.write_text("\n".join(L))


def make_plots(args, report: dict, runs: list[dict], V: dict[str, Variant]) -> None:
    from .plots import plot_losses, plot_pca
    for target in args.targets:
        entry = report["plots"].setdefault(target, {})
        mine = [r for r in runs if r["target"] == target]
        if not mine:
            continue
        D = len(mine[0]["roles"])
        curves = {}
        for k in args.variants:
            rows = [load_metrics(args.output_dir / r["dir"]) for r in mine if r["variant"] == k]
            rows = [x for x in rows if x]
            if rows:
                keys = ("ce", "kd", "dom", "dom_acc") if V[k].trains_domain_head else ("ce", "kd")
                curves[V[k].label] = mean_curves(rows, keys)
        if curves:
            name = f"loss_curves_{target}.png"
            plot_losses(curves, args.output_dir / name,
                        f"target {target}: loss curves, mean over seeds", D)
            entry["loss_curves"] = name
        prada = [k for k in args.variants if V[k].has_prompt][-1:]
        pca_variants = [k for k in ["cot", *prada] if k in args.variants] or args.variants[:1]
        for seed in args.seeds:
            chosen = [next((r for r in mine if r["variant"] == k and r["seed"] == seed), None)
                      for k in pca_variants]
            if all(chosen):
                break
        else:
            continue
        panels = []
        for k, r in zip(pca_variants, chosen):
            f = features_of(args.output_dir / r["dir"])
            coords, _, ratio = pca_2d(f["features"])
            probe = r["probe_accuracy"]
            panels.append({"title": f"{V[k].label}\nprobe acc {probe:.2f}" if probe is not None
                           else V[k].label, "coords": coords.numpy(), "labels": f["labels"].numpy(),
                           "domains": f["domains"], "roles": f["roles"], "ratio": ratio.tolist()})
            entry.setdefault("pca_explained_variance", {})[k] = ratio.tolist()
        name = f"pca_{target}.png"
        plot_pca(panels, args.output_dir / name,
                 f"pooled student features of held-out records, target {target}, seed {seed} "
                 f"(chance {1 / D:.2f})")
        entry["pca"], entry["pca_seed"] = name, seed


def teacher_fits(cache: Path) -> list[dict]:
    """The auto-teacher fits in the cache (seconds and final loss of each)."""
    fits = []
    for f in sorted(Path(cache).glob("*/prada_teacher_fit.json")):
        info = json.loads(f.read_text())
        fits.append({"dir": f.parent.name, **{k: info.get(k) for k in
                                               ("seed", "steps", "seconds", "final_loss")}})
    return fits


def build_report(args, argv: list[str], runs: list[dict], n_trained: int, t0: float) -> dict:
    V = variants(args.prompt_len)
    report = {
        # the command that produces these runs (a --report-only rebuild shows the training command)
        "command": "python -m prada_fast.experiments.compare" + "".join(
            " " + shlex.quote(a) for a in argv if a != "--report-only"),
        "argv": argv,
        "config": {"seeds": args.seeds, "targets": args.targets, "variants": args.variants,
                   "max_steps": args.max_steps, "teacher_steps": args.teacher_steps,
                   "eval_per_domain": args.eval_per_domain, "log_every": args.log_every,
                   "data": args.data, "student": args.student, "teacher": args.teacher,
                   "ds": args.ds, "nproc": args.nproc, "threads": args.threads,
                   "extra": args.extra, "prompt_len": args.prompt_len,
                   "trainer_env": {k: trainer_env(args).get(k) for k in
                                   ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
                   "probe_folds": args.probe_folds, "teacher_cache": str(args.teacher_cache),
                   "knobs": default_knobs(args), "tune": args.tune,
                   "tune_grid": {"lambda_max": args.tune_lambdas, "head_lr_mult": args.tune_head_mults,
                                 "prompt_encoder": args.tune_prompt_encoders,
                                 "seeds": args.tune_seeds} if args.tune else None},
        "variants": {k: {"label": V[k].label, "trainer_flags": list(V[k].flags)} for k in args.variants},
        "versions": versions(), "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_seconds": round(time.time() - t0, 1),
        "run_seconds_total": round(sum(r["wall_seconds"] or 0 for r in runs), 1),
        "n_runs_planned": len(args.targets) * len(args.seeds) * len(args.variants),
        "n_runs_done": len(runs), "n_runs_trained": n_trained,
        "teacher_fits": teacher_fits(args.teacher_cache),
        "results": {}, "plots": {}, "runs": runs,
        "tuning": {t: json.loads(f.read_text()) for t in args.targets
                   if (f := args.output_dir / "tune" / t / "chosen.json").is_file()},
    }
    for target in args.targets:
        mine = [r for r in runs if r["target"] == target]
        by_variant = {k: sorted([r for r in mine if r["variant"] == k], key=lambda r: r["seed"])
                      for k in args.variants}
        by_variant = {k: v for k, v in by_variant.items() if v}
        D = len(mine[0]["roles"]) if mine else None
        report["results"][target] = {
            "n_domains": D, "chance": 1 / D if D else None,
            "variants": {k: summarise(v, V[k]) for k, v in by_variant.items()},
            "paired_vs_cot": paired_differences(by_variant)}
    make_plots(args, report, runs, V)
    return report


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.time()
    V = variants(args.prompt_len)
    plan = [(t, s, V[k]) for t in args.targets for s in args.seeds for k in args.variants]
    if args.dry_run:
        for t, s, v in plan:
            print(shlex.join(launcher(args) + trainer_args(args, t, v, s) + ["--overwrite"]))
        return 0
    try:
        import matplotlib  # noqa: F401  (fail now, not after the training)
    except ImportError:
        print("error: the report's plots need matplotlib: pip install matplotlib "
              "(or pip install -e '.[bench]')", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(args.output_dir)
    if lock is None:
        print(f"error: another comparison is running in {args.output_dir}", file=sys.stderr)
        return 2
    log(f"{len(plan)} runs ({len(args.targets)} target(s) x {len(args.seeds)} seeds x "
        f"{len(args.variants)} variants) in {args.output_dir}")
    runs, trained_walls = [], []
    try:
        chosen = {t: tune(args, t, trained_walls) if args.tune else
                  {k: default_knobs(args) for k in args.variants} for t in args.targets}
        for i, (t, s, v) in enumerate(plan, 1):
            d = run_dir(args, t, v.key, s)
            targs = trainer_args(args, t, v, s, chosen[t].get(v.key))
            tag = f"[{i}/{len(plan)}] target={t} {v.key} seed={s}"
            status, wall = ensure_run(args, targs, d, tag, trained_walls)
            if status == "missing":
                continue
            r = collect_run(args, t, v, s, status, wall)
            r["knobs"] = chosen[t].get(v.key) if v.trains_domain_head else None
            src = _mean([r["accuracy_after"][x] for x, ro in r["roles"].items() if ro == "source"])
            tgt = _mean([r["accuracy_after"][x] for x, ro in r["roles"].items() if ro == "target"])
            head = _f(r["domain_classifier_accuracy"]) if v.trains_domain_head else "untrained"
            log(f"{tag}: {'done in %.0f s; ' % wall if wall else ''}acc source "
                f"{_f(src)} target {_f(tgt)}, domain head {head}, probe {_f(r['probe_accuracy'])}")
            runs.append(r)
    except KeyboardInterrupt:
        log("interrupted: rerun the same command to continue (finished runs are kept)")
        return 130
    if not runs:
        log("no finished runs: nothing to report")
        return 1
    report = build_report(args, argv, runs, len(trained_walls), t0)
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.output_dir / "report.md")
    pngs = [p for e in report["plots"].values() for p in e.values()
            if isinstance(p, str) and p.endswith(".png")]
    log(f"report: {args.output_dir / 'report.md'} (and report.json, {', '.join(pngs)}); "
        f"wall {report['wall_seconds'] / 60:.1f} min")
    return 0


def _lock(out: Path):
    """An exclusive lock on OUTPUT_DIR/.lock for this process (None: held by another), so that
    two invocations never train into the same run directories."""
    import fcntl
    fh = open(out / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
