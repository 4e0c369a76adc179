"""The run directory: the name of every file a run writes there (`RunDir`), refusing to mix
runs, and claiming it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from prada_fast.common.files import write_text_atomic


@dataclass(frozen=True)
class RunDir:
    """--output-dir and what a run leaves in it (README, "What a run does and leaves behind")."""
    root: Path

    @property
    def run_config(self) -> Path:      # the run's flags, written when the run claims the folder
        return self.root / "run_config.json"

    @property
    def ranks(self) -> Path:           # rank -> pid, for signalling one rank by hand
        return self.root / "ranks.json"

    @property
    def metrics(self) -> Path:         # one JSON line per logged step
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:         # written last: the run is finished when it is there
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:           # the exported model (models/final.py)
        return self.root / "final"

    def generations(self, when: str) -> Path:  # the held-out records' answers, "before" / "after"
        return self.root / f"generations_{when}.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


class RunDirError(ValueError):
    """The output directory holds something we must not overwrite."""


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing run needs --resume or --overwrite (reads only)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise RunDirError(f"--output-dir {out} already holds a run: pass --resume to continue it "
                          "or --overwrite to replace it")


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool, run_config: dict) -> RunDir:
    """Claim the output directory (after check_output_dir and input validation): emptied
    with `overwrite`, then `run_config` written to it."""
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if overwrite and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    write_text_atomic(run.run_config, json.dumps(run_config, indent=2) + "\n")
    return run
