"""The command: plan the runs, tune, train or reuse each, then report."""
from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prada_fast.common.exits import ExitCode

from .flags import parse_args
from .report import build_report, write_markdown
from .runs import (_lock, collect_run, default_knobs, drop_weights, ensure_run, launcher, log, run_dir,
                   trainer_args)
from .statistics import _f, _mean
from .tuning import tune
from .variants import variants


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag (2, its one line printed)
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    t0 = time.time()
    V = variants(args.prompt_len)
    plan = [(t, s, V[k]) for t in args.targets for s in args.seeds for k in args.variants]
    if args.dry_run:
        for t, s, v in plan:
            print(shlex.join(launcher(args) + trainer_args(args, t, v, s) + ["--overwrite"]))
        return ExitCode.OK
    try:
        import matplotlib  # noqa: F401  (fail now, not after the training)
    except ImportError:
        print("error: the report's plots need matplotlib: pip install matplotlib "
              "(or pip install -e '.[bench]')", file=sys.stderr)
        return ExitCode.BAD_INPUT
    args.output_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(args.output_dir)
    if lock is None:
        print(f"error: another comparison is running in {args.output_dir}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    log(f"{len(plan)} runs ({len(args.targets)} target(s) x {len(args.seeds)} seeds x "
        f"{len(args.variants)} variants) in {args.output_dir}")
    runs, trained_walls = [], []
    try:
        chosen = {t: tune(args, t, trained_walls) if args.tune else
                  {k: default_knobs(args) for k in args.variants} for t in args.targets}
        runs = train_plan(args, plan, chosen, trained_walls)
    except KeyboardInterrupt:
        log("interrupted: rerun the same command to continue (finished runs are kept, an "
            "unfinished one resumes from its latest checkpoint)")
        return ExitCode.INTERRUPTED
    if not runs:
        log("no finished runs: nothing to report")
        return ExitCode.FAILED
    if args.blind and len(runs) < len(plan):
        log(f"{len(runs)} of {len(plan)} runs are finished: no report until all are (--blind); "
            "rerun the same command to continue")
        return ExitCode.OK
    report = build_report(args, argv, runs, len(trained_walls), t0)
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.output_dir / "report.md")
    pngs = [p for e in report["plots"].values() for p in e.values()
            if isinstance(p, str) and p.endswith(".png")]
    log(f"report: {args.output_dir / 'report.md'} (and report.json, {', '.join(pngs)}); "
        f"wall {report['wall_seconds'] / 60:.1f} min")
    return ExitCode.OK


def train_plan(args, plan, chosen: dict, walls: list[float]) -> list[dict]:
    """Train (or reuse) every run of the plan, --jobs of them at once, and collect what each
    measured, in plan order. With the auto teacher, the first run of a teacher's runs (a
    target's, or a seed's with --teacher-per-seed) trains before the others start: it fits
    the teacher they share."""
    collecting = threading.Lock()  # the pooled features are computed in this process, one run at a time
    done: dict[int, dict] = {}

    def one(i: int, t: str, s: int, v, alone: bool = False) -> None:
        d = run_dir(args, t, v.key, s)
        tag = f"[{i}/{len(plan)}] target={t} {v.key} seed={s}"
        status, wall = ensure_run(args, trainer_args(args, t, v, s, chosen[t].get(v.key)), d, tag, walls,
                                  alone=alone)
        if status == "missing":
            return
        with collecting:
            r = collect_run(args, t, v, s, status, wall)
            r["knobs"] = chosen[t].get(v.key) if v.trains_domain_head or v.lm else None
            src = _mean([r["accuracy_after"][x] for x, ro in r["roles"].items() if ro == "source"])
            tgt = _mean([r["accuracy_after"][x] for x, ro in r["roles"].items() if ro == "target"])
            head = _f(r["domain_classifier_accuracy"]) if v.trains_domain_head else "untrained"
            target = "hidden until every run is finished (--blind)" if args.blind else _f(tgt)
            log(f"{tag}: {'done in %.0f s; ' % wall if wall else ''}acc source "
                f"{_f(src)} target {target}, domain head {head}, probe {_f(r['probe_accuracy'])}")
            done[i] = r
            if args.drop_weights:
                drop_weights(d, args.probe_folds)

    teachers = set()
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = []
        for i, (t, s, v) in enumerate(plan, 1):
            key = (t, s if args.teacher_per_seed else None)
            if args.teacher == "auto" and key not in teachers:
                teachers.add(key)
                for f in futures:  # the runs before it end first: it trains alone
                    f.result()
                one(i, t, s, v, alone=True)  # it fits (or finds) the teacher its other runs share
            else:
                futures.append(pool.submit(one, i, t, s, v))
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [done[i] for i in sorted(done)]


if __name__ == "__main__":
    sys.exit(main())
