"""ZeRO checkpoints that stay usable, with the state an exact resume needs: the step
(which fixes the data position, see batching.py) and every rank's random number generators.

* A save goes to `TAG.partial`; once every rank has written its shard, rank 0 writes a
  manifest (every file and its size), renames the folder to `TAG`, and only then does
  `latest` (itself replaced atomically) name it: a kill at any moment leaves `latest`
  naming a complete checkpoint.
* A save that fails on any rank (a full disk: OSError) fails on every rank: the partial
  folder is removed, `latest` still names the previous checkpoint, and every rank raises
  CheckpointSaveError. Any other exception is a bug and keeps its traceback.
* `--resume` checks the manifest of the checkpoint `latest` names; a file that is missing
  or shorter than written is named, and the newest earlier complete checkpoint is used.
* `keep` (--keep-checkpoints) bounds the disk: older checkpoints are deleted after a save.
* `rank_state`: state of this rank's own beside DeepSpeed's (the --domain-steps head and its
  optimizer, trainer/domain_steps.py), one file per rank, RANK_STATE; `load` reads it back
  when asked for, and refuses a checkpoint that has it when not (or lacks it when asked).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import torch

from prada_fast.common import distributed as dist_util
from prada_fast.common.files import write_text_atomic
LATEST = "latest"
MANIFEST = "prada_manifest.json"
RANK_STATE = "prada_rank{rank}_state.pt"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (bad input: exit 2)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is still `latest`."""


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


def _step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def _step_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoint folders (stepN) in `ckpt_dir`, oldest first."""
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _step_of(p.name) is not None),
                  key=_step_of)


def _write_manifest(folder: Path, step: int, zero_stage: int) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_text_atomic(folder / MANIFEST, json.dumps(
        {"step": step, "world_size": dist_util.world_size(), "zero_stage": zero_stage, "files": files},
        indent=1) + "\n")


def _stage_mismatch(manifest: dict, stage: int) -> str | None:
    """How the ZeRO stage a checkpoint was saved at differs from `stage` (None: it does
    not). Manifests from before the stage was recorded tell ZeRO (its partition files,
    *zero_pp_rank_*) from stage 0 only."""
    if "zero_stage" in manifest:
        return None if manifest["zero_stage"] == stage else f"ZeRO stage {manifest['zero_stage']}"
    zero = any("zero_pp_rank_" in Path(f).name for f in manifest.get("files", {}))
    return None if zero == (stage > 0) else ("a ZeRO stage above 0" if zero else "ZeRO stage 0")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def save(engine, ckpt_dir: Path, step: int, extra: dict | None = None, keep: int = 0,
         rank_state: dict | None = None) -> None:
    """Collective: every rank calls it. keep > 0: keep only the newest `keep` checkpoints.
    rank_state: this rank's own state (torch.save-able), written beside DeepSpeed's files."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step}"
    partial, final = ckpt_dir / f"{tag}.partial", ckpt_dir / tag
    rank0 = dist_util.rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    dist_util.barrier()
    client = {"step": step, "rng": _rng_state(), **(extra or {})}
    err = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client,
                               save_latest=False)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, see below
        err = e
        dist_util.barrier()  # the barrier that ends DeepSpeed's save on the ranks where it worked
    if err is None and rank_state is not None:
        try:
            torch.save(rank_state, partial / RANK_STATE.format(rank=dist_util.rank()))
        except OSError as e:
            err = e
    if dist_util.any_rank(err is not None):
        _fail(ckpt_dir, tag, partial, None, err)
    if rank0:
        try:
            _write_manifest(partial, step, engine.zero_optimization_stage())
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            write_text_atomic(ckpt_dir / LATEST, tag)
        except Exception as e:  # noqa: BLE001
            err = e
    if dist_util.any_rank(err is not None):
        _fail(ckpt_dir, tag, partial, final, err)
    if rank0 and keep > 0:
        prune(ckpt_dir, keep)
    dist_util.barrier()


def _fail(ckpt_dir: Path, tag: str, partial: Path, final: Path | None, err) -> None:
    """Clean up after a failed save on every rank, then raise on every rank."""
    if dist_util.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        if final is not None and latest_tag(ckpt_dir) != tag:
            shutil.rmtree(final, ignore_errors=True)
    dist_util.barrier()
    if err is not None and not isinstance(err, OSError):
        raise err  # not the disk: a bug, with its traceback
    prev = latest_tag(ckpt_dir)
    what = _first_line(err) if err is not None else "another rank could not write its shard"
    raise CheckpointSaveError(
        f"checkpoint {ckpt_dir / tag} could not be written ({what}); "
        + (f"the latest checkpoint is still {ckpt_dir / prev}: free space, then rerun with --resume"
           if prev else "there is no earlier checkpoint"))


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names),
    and partial folders left by crashed saves."""
    latest = latest_tag(ckpt_dir)
    tags = _step_tags(ckpt_dir)
    for t in tags[:max(0, len(tags) - keep)]:
        if t != latest:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    for p in ckpt_dir.glob("*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, if that folder exists."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be used (a missing or truncated file, named),
    or None when every file the save wrote is there with its size."""
    if not folder.is_dir():
        return f"{folder} is missing"
    path = folder / MANIFEST
    if not path.is_file():
        return f"{path} is missing (the save did not finish)"
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} cannot be read ({_first_line(e)})"
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        have = p.stat().st_size
        if have != size:
            return f"{p} is truncated ({have} of {size} bytes)" if have < size else \
                f"{p} has {have} bytes, the save wrote {size}"
    return None


def choose(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """(the tag to resume from, the problems met on the way): the checkpoint `latest`
    names, else the newest earlier complete one. (None, []) when there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    tags = _step_tags(ckpt_dir)[::-1]  # newest first
    named = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    if named and _step_of(named) is not None:  # nothing newer than what `latest` names
        tags = [named] + [t for t in tags if _step_of(t) < _step_of(named)]
    problems = []
    for tag in tags:
        why = problem(ckpt_dir / tag)
        if why is None:
            if problems:
                problems.append(f"using the previous complete checkpoint, {ckpt_dir / tag}")
            return tag, problems
        problems.append(f"checkpoint {tag} is unusable: {why}")
    return None, problems


def load(engine, ckpt_dir: Path, log=print, rank_state: bool = False) -> tuple[str | None, dict | None]:
    """Collective. Load the newest usable checkpoint (see `choose`; rank 0 decides for
    all); returns (its tag, its client state), or (None, None) when there is none.
    rank_state: the client state's "rank_state" is this rank's file of `save(rank_state=)`.
    Raises CheckpointError when checkpoints exist but none is usable, when they were saved
    by another number of ranks, or when DeepSpeed cannot read the chosen one."""
    ckpt_dir = Path(ckpt_dir)
    tag, problems = dist_util.wait_for_rank0("resume-checkpoint",
                                             choose(ckpt_dir) if dist_util.rank() == 0 else None)
    for p in problems:
        log(p)
    if tag is None:
        if problems:
            raise CheckpointError(f"--resume: no usable checkpoint in {ckpt_dir} ({problems[0]})")
        return None, None
    manifest = json.loads((ckpt_dir / tag / MANIFEST).read_text())
    saved_by = manifest.get("world_size")
    if saved_by is not None and saved_by != dist_util.world_size():
        raise CheckpointError(f"--resume: {ckpt_dir / tag} was saved by {saved_by} ranks and this run "
                              f"has {dist_util.world_size()}: resume with the same number of ranks")
    stage = engine.zero_optimization_stage()
    saved_at = _stage_mismatch(manifest, stage)
    if saved_at:
        hint = ("the same DeepSpeed config" if dist_util.world_size() > 1 else "--one-rank-zero keep"
                if saved_at != "ZeRO stage 0" else "--one-rank-zero skip (the default)")
        raise CheckpointError(f"--resume: {ckpt_dir / tag} was saved at {saved_at} and this "
                              f"run trains at stage {stage}: resume with {hint}")
    own = ckpt_dir / tag / RANK_STATE.format(rank=dist_util.rank())
    if own.is_file() != rank_state:
        raise CheckpointError(
            f"{ckpt_dir / tag}: saved with the domain head trained on its own (--domain-steps 1 or "
            "more); resume with the same --domain-steps" if not rank_state else
            f"{ckpt_dir / tag}: saved with the domain head in DeepSpeed's optimizer (--domain-steps "
            "0); resume with --domain-steps 0")
    try:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if client is not None and rank_state:
            client["rank_state"] = torch.load(own, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError,
            zipfile.BadZipFile) as e:  # what torch.load raises on a damaged file
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint "
                              f"({_first_line(e)}); delete it to resume from an earlier one") from e
    if client is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint; "
                              "delete it to resume from an earlier one")
    if "rng" in client:
        _set_rng_state(client["rng"])
    return tag, client
