"""The run directory: guarding it, and the end-of-run table."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

RUN_FILE = "run_config.json"


class RunDirError(ValueError):
    """The output directory holds something we must not overwrite."""


def check_output_dir(out: Path, args) -> None:
    """Refuse to mix runs: an existing run needs --resume or --overwrite (reads only)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file")
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise RunDirError(f"--output-dir {out} already holds a run: pass --resume to continue it "
                          "or --overwrite to replace it")


def prepare_output_dir(out: Path, args) -> None:
    """Claim the output directory (after check_output_dir and input validation)."""
    check_output_dir(out, args)
    exists = out.exists() and any(out.iterdir())
    if exists and args.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in vars(args).items() if k != "local_rank"}
    (out / RUN_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(summary: dict) -> None:
    rows = [("domain", "role", "acc before", "acc after")]
    for d, v in summary["domains"].items():
        rows.append((d, v["role"], _fmt(v["accuracy_before"]), _fmt(v["accuracy_after"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print(line)
    print(line)
    print(f"domain classifier accuracy: {_fmt(summary['domain_classifier_accuracy'])} "
          f"(before {_fmt(summary.get('domain_classifier_accuracy_before'))}, chance "
          f"{1 / max(len(summary['domains']), 1):.3f}); fresh probe on the pooled question "
          f"features: {_fmt(summary.get('domain_probe_accuracy'))} "
          f"(before {_fmt((summary.get('domain_alignment') or {}).get('probe_accuracy_before'))})")
    print(f"final loss {summary['final_loss']:.4f}  steps {summary['steps']}  "
          f"tokens/s {summary['tokens_per_s']:.0f} (real tokens; padding "
          f"{summary.get('padding_fraction', 0):.1%} of positions)  wall {summary['wall_seconds']}s",
          flush=True)
