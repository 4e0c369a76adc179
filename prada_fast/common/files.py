"""Writing files so that a crash never leaves half of one: write a temporary file beside
the target, flush and fsync it, then rename it into place (a rename within a directory is
atomic on POSIX file systems). Readers see the old file or the new one, never a mix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, per process (ranks writing at once never share one),
    keeping the suffix (numpy appends .npy to a name without it)."""
    return path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the content to a temporary path; it is fsynced and renamed to `path`."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows) -> None:
    """One JSON object a line, all or nothing."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def replace_dir(build: Callable[[Path], None], out: str | os.PathLike, *,
                keep_existing: bool = False) -> bool:
    """Build a directory at a temporary path (`build(tmp)`), then rename it to `out`.
    keep_existing: another process that finished first wins (returns False, ours is
    dropped); otherwise an existing `out` is replaced. Returns whether ours is in place."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        build(tmp)
        if not keep_existing:
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # keep_existing: a non-empty `out` is already there
            if not keep_existing:
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
