"""Training from a cached teacher against the live teacher, end to end on this machine:
the trainer (`prada_fast/train.py`, a world of one) with `--teacher DIR` and with
`--teacher-outputs CACHE` on the same data, student and seed.

    python -m benchmarks.studies.cached_teacher [--steps 30 --records 200 --threads 1]
        [--vocab V] [--student-width H --student-layers L] [--teacher-width H --teacher-layers L]
        [--out benchmarks/out/cached_teacher]

The teacher is the tiny-teacher preset widened and deepened (random weights: the speed does
not depend on them) to several times the `tiny` student's FLOPs per token; the flags above
scale both models and give them a larger vocabulary (the byte tokenizer's ids stay below 260,
the heads and the loss op run over all V), so that the LM heads weigh what they do in real
models. Beside the measured ratios it prints the FLOP-bound ones: what each run would reach
if a step cost only its matrix products (student forward + backward, teacher body, teacher
head product). The gap between the two is the per-step cost that does not shrink with the
teacher (DeepSpeed's hooks and optimizer step, the data path, Python). For each cache
mode: the build time of `python -m prada_fast.precompute_teacher` and its bytes per cached
token (one token = one labelled position). For each training run: the median tokens/s of the
steps after the first `--warmup` (the trainer's own per-step figure in metrics.jsonl: input
tokens of the global batch over the step's wall time) and the peak resident memory of the
process (GNU time's maximum RSS). A top-k cache is trained from only where the loss op takes
top-k teacher inputs. Not a pytest case: a run takes minutes. Prints a markdown table and
writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the default teacher: the tiny-teacher preset, larger (the student, `tiny`: H 128, 3 layers)
TEACHER_WIDTH, TEACHER_LAYERS = 256, 6


def shape(width: int, layers: int, vocab: int | None) -> dict:
    """Config overrides of a Llama-shaped preset: heads of 32 dims, the MLP at 2.75x."""
    cfg = dict(hidden_size=width, intermediate_size=int(width * 2.75), num_hidden_layers=layers,
               num_attention_heads=width // 32, num_key_value_heads=width // 32)
    return {**cfg, "vocab_size": vocab} if vocab else cfg


def body_flops(cfg) -> int:
    """2 x the weights one token's forward pass through the layers multiplies by (attention
    scores left out)."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    return 2 * n * (2 * h * h + 2 * h * kv + 3 * h * i)


def flops_per_token(cfg) -> int:
    """Forward FLOPs per token, LM head included."""
    return body_flops(cfg) + 2 * cfg.vocab_size * cfg.hidden_size


def flop_bound(student, teacher) -> dict:
    """FLOPs per token of a training step with each teacher source: the student's forward and
    backward (3x its forward), the teacher's layers (live only) and the teacher's head product
    inside the loss op (live and hidden cache; the top-k cache needs none)."""
    s = 3 * flops_per_token(student)
    head = 2 * teacher.vocab_size * teacher.hidden_size
    return {"live teacher": s + body_flops(teacher) + head, "hidden cache": s + head, "top-k cache": s}


def timed(cmd, env, log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of a command, its output kept in `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} exited {proc.returncode}; see {log}\n{text[-3000:]}")
    kb = int(text.rsplit("maxrss_kb=", 1)[1].split()[0])
    return wall, kb // 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.cached_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--records", type=int, default=200, help="synthetic records per domain")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64,
                   help="sequences per optimizer step (train_batch_size of ds_configs/zero3.json)")
    p.add_argument("--k", type=int, default=32, help="K of the top-k cache")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--vocab", type=int, default=0,
                   help="vocabulary of both models (0: the byte tokenizer's, 259)")
    p.add_argument("--student-width", type=int, default=128, help="student hidden size (`tiny`: 128)")
    p.add_argument("--student-layers", type=int, default=3, help="student layers (`tiny`: 3)")
    p.add_argument("--teacher-width", type=int, default=TEACHER_WIDTH, help="teacher hidden size")
    p.add_argument("--teacher-layers", type=int, default=TEACHER_LAYERS, help="teacher layers")
    p.add_argument("--out", default="benchmarks/out/cached_teacher", metavar="DIR")
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO),
               PRADA_FAST_CACHE=str(out / "fit-cache"))
    sys.path.insert(0, str(REPO))
    from prada_fast.models import load_causal_lm

    teacher_dir = out / "teacher"
    teacher, tok = load_causal_lm(
        "tiny-teacher", config_overrides=shape(args.teacher_width, args.teacher_layers, args.vocab), seed=1)
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    # the default shape() is the `tiny` preset's own (H 128, MLP 352, 4 heads, 3 layers)
    student, _ = load_causal_lm("tiny", config_overrides=shape(
        args.student_width, args.student_layers, args.vocab), seed=0)
    student_arg = str(out / "student")
    student.save_pretrained(student_arg)
    tok.save_pretrained(student_arg)
    ratio = flops_per_token(teacher.config) / flops_per_token(student.config)
    bound = flop_bound(student.config, teacher.config)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["train_batch_size"] = args.batch
    (out / "zero3.json").write_text(json.dumps(ds))
    common = ["--ds", str(out / "zero3.json"), "--data", f"synthetic:{args.records}",
              "--eval-per-domain", "0", "--max-len", str(args.max_len), "--seed", "0", "--no-progress",
              "--teacher", str(teacher_dir), "--student", student_arg]

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
               "batch": args.batch, "load_before": os.getloadavg()[0],
               "teacher_flops_over_student": round(ratio, 2),
               "models": {"vocab": student.config.vocab_size,
                          "student": [student.config.hidden_size, student.config.num_hidden_layers],
                          "teacher": [teacher.config.hidden_size, teacher.config.num_hidden_layers]},
               "flops_per_token": bound, "caches": {}, "runs": {}}
    caches = {"hidden": ["--mode", "hidden", "--dtype", "float32"],
              "topk": ["--mode", "topk", "--k", str(args.k)]}
    for mode, flags in caches.items():
        cache = out / f"cache-{mode}"
        if cache.exists():
            import shutil
            shutil.rmtree(cache)
        wall, rss = timed([sys.executable, "-m", "prada_fast.precompute_teacher", "--out", str(cache),
                           *common, *flags], env, out / f"precompute-{mode}.log")
        m = json.loads((cache / "manifest.json").read_text())
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        results["caches"][mode] = {"seconds": round(wall, 1), "positions": m["rows"],
                                   "bytes": size, "bytes_per_token": round(size / m["rows"], 1),
                                   "peak_rss_mib": rss}

    runs = {"live teacher": [], "hidden cache": ["--teacher-outputs", str(out / "cache-hidden")],
            "top-k cache": ["--teacher-outputs", str(out / "cache-topk")]}
    for name, flags in runs.items():
        run_dir = out / ("run-" + name.replace(" ", "-"))
        wall, rss = timed([sys.executable, "prada_fast/train.py", *common, *flags, "--output-dir",
                           str(run_dir), "--overwrite", "--max-steps", str(args.steps),
                           "--log-every", "1", "--save-every", "0"], env, out / f"{run_dir.name}.log")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_s"] for r in rows if r["step"] > args.warmup]
        results["runs"][name] = {"tokens_per_s": round(statistics.median(tps), 1),
                                 "final_loss": rows[-1]["loss"], "peak_rss_mib": rss,
                                 "wall_s": round(wall, 1)}
    live = results["runs"]["live teacher"]["tokens_per_s"]
    for name, r in results["runs"].items():
        r["speedup"] = round(r["tokens_per_s"] / live, 2)
        r["flop_bound_speedup"] = round(bound["live teacher"] / bound[name], 2)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    m = results["models"]
    print(f"\nvocabulary {m['vocab']}; student H {m['student'][0]} x {m['student'][1]} layers, teacher "
          f"H {m['teacher'][0]} x {m['teacher'][1]} layers; "
          f"teacher {ratio:.1f}x the student's FLOPs per token; {args.batch} sequences per step; "
          f"{args.threads} thread(s); {results['date']}; load average before "
          f"{results['load_before']:.1f}\n")
    print("| run | tokens/s (median) | vs live | FLOP-bound vs live | MFLOP per token | peak RSS | "
          "final loss |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['flop_bound_speedup']:.2f}x | "
              f"{bound[name] / 1e6:.1f} | {r['peak_rss_mib']} MiB | {r['final_loss']:.4f} |")
    print("\n| cache | build time | positions | bytes per cached token | size |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for mode, c in results["caches"].items():
        print(f"| {mode} | {c['seconds']:.0f} s | {c['positions']} | {c['bytes_per_token']:.0f} | "
              f"{c['bytes'] / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
