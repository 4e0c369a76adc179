"""ZeRO checkpoints that survive a crash during a save, with the state a bit-exact resume
needs: the step (which fixes the data position, see batching.py) and every rank's random
number generators. A save goes to `TAG.partial`, is renamed to `TAG` once every rank has
written its shard, and only then does `latest` (itself replaced atomically) name it: a kill
at any moment leaves `latest` naming a complete checkpoint."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from . import distributed as dist_util

LATEST = "latest"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, extra: dict | None = None) -> None:
    """Collective: every rank calls it."""
    tag = f"step{step}"
    partial = ckpt_dir / f"{tag}.partial"
    if dist_util.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist_util.barrier()
    client = {"step": step, "rng": _rng_state(), **(extra or {})}
    engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client, save_latest=False)
    dist_util.barrier()
    if dist_util.rank() == 0:
        final = ckpt_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(ckpt_dir / LATEST, tag)
    dist_util.barrier()


def latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def load(engine, ckpt_dir: Path) -> dict | None:
    """Load the checkpoint `latest` names; returns its client state (None: nothing to load)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    if "rng" in client:
        _set_rng_state(client["rng"])
    return client
