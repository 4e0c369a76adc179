"""One run of the comparison: its trainer flags, its directory, training it in a
subprocess (or reusing it when finished with the same flags), and what it measured."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prada_fast.common.distributed import launch_cmd
from prada_fast.common.files import write_text_atomic
from prada_fast.models.final import is_final
from prada_fast.trainer import checkpoint

from .flags import usable_cores
from ..analysis import domain_variance_share, head_input, load_metrics, pooled_features, probe_accuracy
from .statistics import _mean
from .variants import Variant, knob_flags

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"


def run_dir(args, target: str, variant: str, seed: int) -> Path:
    return args.output_dir / "runs" / target / variant / f"seed{seed}"


def default_knobs(args) -> dict:
    return {"lambda_max": args.lambda_max, "head_lr_mult": args.domain_head_lr_mult,
            "domain_steps": args.domain_steps, "prompt_encoder": args.prompt_encoder,
            "lm_weight": args.lm_weight}


def trainer_args(args, target: str, v: Variant, seed: int, knobs: dict | None = None, *,
                 sources: list[str] | None = None, out: Path | None = None) -> list[str]:
    """The trainer flags of one run (without the launcher and script). sources: keep only
    these labelled domains and `target` (the tuning runs' pseudo-target split)."""
    out = out or run_dir(args, target, v.key, seed)
    a = ["--output-dir", str(out), "--seed", str(seed),
         "--max-steps", str(args.max_steps), "--teacher-steps", str(args.teacher_steps),
         "--eval-per-domain", str(args.eval_per_domain), "--log-every", str(args.log_every),
         "--target-domains", target, "--student", args.student, "--teacher", args.teacher,
         "--teacher-fit-cache", str(args.teacher_fit_cache), "--no-progress", "--layer-probes",
         # checkpoints so that an interrupted run resumes (two kept: one stays complete while
         # the next is written); a finished run keeps only its last (ensure_run)
         "--save-every", str(args.save_every), "--keep-checkpoints", "2"]
    if not args.teacher_per_seed:  # one teacher and one data set for all seeds
        a += ["--teacher-seed", str(args.teacher_seed), "--data-seed", str(args.teacher_seed)]
    if sources:
        a += ["--source-domains", ",".join(sources)]
    if args.ds:
        a += ["--ds", args.ds]
    for spec in args.data:
        a += ["--data", spec]
    return a + list(v.flags) + knob_flags(v, knobs or default_knobs(args)) + list(args.extra)


def launcher(args) -> list[str]:
    return launch_cmd(TRAIN_SCRIPT, args.nproc)


# A launcher's variables name this process's place in a job; each training run is a job of its own.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


def run_threads(args, alone: bool = False) -> int | None:
    """OMP_NUM_THREADS of a trainer process: --threads, else the cores over --jobs when runs
    share the machine; None (every core) for a run that trains alone."""
    if args.threads:
        return args.threads
    return max(1, usable_cores() // args.jobs) if args.jobs > 1 and not alone else None


def trainer_env(args, alone: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.pop("OMP_NUM_THREADS", None)
    threads = run_threads(args, alone)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
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
    """A run whose trainer ended: its summary.json, and its final weights or, where they were
    dropped (--drop-weights), its record (record_of) of that same summary."""
    if not (d / "summary.json").is_file():
        return False
    return is_final(d / "final") or _record(d) is not None


# flags that change where a run writes or how often it saves, never what it computes
NOT_COMPARED = ("--output-dir", "--teacher-fit-cache", "--teacher-cache", "--save-every",
                "--keep-checkpoints")


def _comparable(argv: list[str]) -> list[str]:
    """Trainer flags without the paths and the checkpoint cadence (so that a moved experiment
    directory, or one made with another --save-every, still matches)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in NOT_COMPARED:
            skip = True
        else:
            out.append(a)
    return out


def _flags_of(path: Path) -> list[str] | None:
    """The trainer flags a sidecar (compare_run.json, seed<S>.started.json) recorded, if any."""
    return json.loads(path.read_text()).get("trainer_args") if path.is_file() else None


def check_reusable(d: Path, argv: list[str]) -> None:
    old = _flags_of(d / SIDECAR)
    if old is not None and _comparable(old) != _comparable(argv):
        raise SystemExit(
            f"error: {d} holds a finished run made with other trainer flags:\n  {shlex.join(old)}\n"
            f"this experiment wants:\n  {shlex.join(argv)}\n"
            "use another --output-dir, or delete that run directory to redo it")


def started_file(d: Path) -> Path:
    """Beside the run directory (the trainer empties it when it starts afresh): the flags of
    a run that has started and not finished, so that only the same experiment resumes it."""
    return d.with_name(d.name + ".started.json")


def resumable(d: Path, argv: list[str]) -> str | None:
    """The checkpoint an unfinished run of these same flags left in d, to resume from; None
    when there is none (then the run starts afresh)."""
    old = None if finished(d) else _flags_of(started_file(d))
    if old is None or _comparable(old) != _comparable(argv):
        return None
    return checkpoint.latest_tag(d / "checkpoints")


def log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def train_one(args, argv: list[str], log_path: Path, resume: bool = False, alone: bool = False) -> float:
    """Train one run in a subprocess, its output into log_path; resume: continue the unfinished
    run in its directory (its log is appended to), else start afresh; alone: no other run
    trains meanwhile (it gets every core). Returns wall seconds."""
    cmd = launcher(args) + argv + ["--resume" if resume else "--overwrite"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "a" if resume else "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=trainer_env(args, alone), text=True, bufsize=1)
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


def _summary_sha256(d: Path) -> str:
    return hashlib.sha256((d / "summary.json").read_bytes()).hexdigest()


def _record(d: Path) -> dict | None:
    """The run's record (FEATURES) when it was made from its current summary.json, else None
    (absent, or made for another run: a retrained one, or by an older version without the
    summary's digest). Checked by content, not by time: a record copied or checked out keeps."""
    path = d / FEATURES
    if not path.is_file():
        return None
    try:
        rec = torch.load(path)
    except Exception:  # cut short (older versions wrote it in place): made again from final/
        return None
    return rec if isinstance(rec, dict) and rec.get("summary_sha256") == _summary_sha256(d) else None


_OTHER_FOLDS: set[Path] = set()  # runs whose record's probes used other folds, named once


def features_of(d: Path, folds: int = 5) -> dict:
    """The run's record, what the report needs beyond summary.json and metrics.jsonl, computed
    once from its final weights and kept in the run directory (FEATURES): the pooled held-out
    features the domain head reads (the final layer's, or --pool-layer's), their domain labels, each layer's
    domain share (domain_variance_share: 0 the input embeddings, last the final states) and
    the probes inside and outside the domain head's rows (layers.head_subspace, with `folds`:
    made again when the record's used others and the weights are still there). With it the
    run is reported without its weights."""
    rec = _record(d)
    weights = is_final(d / "final")
    if rec is not None:
        made_with = rec.get("probe_folds", folds)  # older records: taken as made with these
        if made_with == folds or not weights:  # else made again with these folds
            if made_with != folds and d not in _OTHER_FOLDS:
                _OTHER_FOLDS.add(d)
                log(f"{d}: its record's head-subspace probes used --probe-folds {made_with}, not "
                    f"{folds}; its weights were dropped, so they are reported as they are")
            return rec
    if not weights:
        raise SystemExit(f"error: {d}: its weights were dropped and {FEATURES} is not the record "
                         "of its summary.json; delete the run directory to retrain it")
    from ..layers import head_subspace
    layers, labels, domains, roles = pooled_features(d, all_layers=True)
    feats = head_input(d, layers)
    rec = {"features": feats, "labels": labels, "domains": domains, "roles": roles,
           "layer_domain_share": [domain_variance_share(f, labels) for f in layers],
           "head_subspace": head_subspace(d, feats, labels, folds=folds),
           "probe_folds": folds, "summary_sha256": _summary_sha256(d)}
    tmp = d / (FEATURES + ".tmp")
    torch.save(rec, tmp)
    os.replace(tmp, d / FEATURES)
    return rec


def drop_weights(d: Path, folds: int = 5) -> None:
    """--drop-weights: once the run's record is written (features_of), delete its final weights
    and checkpoints; what stays (summary, metrics, generations, logs, the record) is what the
    report reads, a few hundred KB."""
    features_of(d, folds)
    for sub in ("final", "checkpoints"):
        shutil.rmtree(d / sub, ignore_errors=True)


def ensure_run(args, argv: list[str], d: Path, tag: str, walls: list[float],
               alone: bool = False) -> tuple[str, float | None]:
    """Train the run of `argv` into d (alone: no other run trains meanwhile), or reuse it when
    finished with the same flags. Returns (status "trained" | "reused" | "missing", wall
    seconds of this training)."""
    if finished(d):
        check_reusable(d, argv)
        log(f"{tag}: finished run found, reused")
        return "reused", None
    if args.report_only:
        log(f"{tag}: missing, skipped (--report-only)")
        return "missing", None
    eta = f" (recent runs took {_mean(walls[-5:]):.0f} s)" if walls else ""
    where = f"log: {d.relative_to(args.output_dir)}.log"
    ckpt = resumable(d, argv)
    if ckpt:
        log(f"{tag}: resuming the unfinished run from its checkpoint {ckpt}{eta}; {where}")
    else:
        log(f"{tag}: training{eta}; {where}")
        d.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(started_file(d), json.dumps({"trainer_args": argv}, indent=2) + "\n")
    started = time.time()
    wall = train_one(args, argv, d.with_name(d.name + ".log"), resume=bool(ckpt), alone=alone)
    walls.append(wall)
    checkpoint.prune(d / "checkpoints", 1)  # the last one: what --save-every 0 leaves
    write_text_atomic(d / SIDECAR, json.dumps(
        {"trainer_args": argv, "wall_seconds": round(wall, 1), "resumed_from": ckpt,
         "started_at": round(started, 2), "ended_at": round(time.time(), 2)}, indent=2) + "\n")
    started_file(d).unlink(missing_ok=True)
    return "trained", wall


def collect_run(args, target: str, v: Variant, seed: int, status: str, wall: float | None) -> dict:
    d = run_dir(args, target, v.key, seed)
    summary = json.loads((d / "summary.json").read_text())
    rows = load_metrics(d)
    last = rows[-1] if rows else {}
    side = d / SIDECAR
    if wall is None and side.is_file():
        wall = json.loads(side.read_text()).get("wall_seconds")
    feats = features_of(d, args.probe_folds)
    x, y = feats["features"], feats["labels"]
    align = summary.get("domain_alignment") or {}
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
        "final": {k: last.get(k) for k in ("ce", "kd", "dom", "dom_acc", "lm", "grl_lambda")},
        # the trainer's fresh probe on every layer's pooled question features (0: embeddings)
        "layer_probes_before": align.get("layer_probe_accuracy_before"),
        "layer_probes_after": align.get("layer_probe_accuracy"),
        "probe_accuracy": probe_accuracy(x, y, kind="logistic", folds=args.probe_folds),
        "ncm_accuracy": probe_accuracy(x, y, kind="ncm", folds=args.probe_folds),
        # the share of the final features' variance between the domain means: it still moves
        # where the probes are at 1.0
        "domain_share": domain_variance_share(x, y),
        "layer_domain_share": feats.get("layer_domain_share"),
        "head_subspace": feats.get("head_subspace"),
        "n_probe": int(len(y)),
    }


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
