"""The run directory: refusing to mix runs, and claiming it."""
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
