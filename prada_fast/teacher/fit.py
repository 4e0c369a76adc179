"""The frozen teacher: a local model directory, or (the default with a preset student and
no teacher given) a small teacher fitted on the labelled rationales and cached on disk, so
that the default run exercises the distillation term without any download."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prada_fast.common.files import replace_dir
from prada_fast.data.format import IGNORE_INDEX
from prada_fast.models import load_causal_lm
from prada_fast.models.packed_attention import backbone_forward, packed_next_targets
from prada_fast.trainer.packing import PackedCollator

FIT_VERSION = 2  # 2: packed rows (1: padded batches)
AUTO_PRESET = "tiny-teacher"  # what `--teacher auto` fits for a preset student
FIT_FILE = "prada_teacher_fit.json"  # in a fitted teacher's directory: how it was fitted
FIT_BATCH = 32


def default_cache_dir() -> Path:
    root = os.environ.get("PRADA_FAST_CACHE") or Path.home() / ".cache" / "prada_fast"
    return Path(root) / "teachers"


def cache_key(preset: str, examples: list[dict], steps: int, lr: float, batch: int,
              seed: int) -> str:
    h = hashlib.sha256(json.dumps([FIT_VERSION, preset, steps, lr, batch, seed]).encode())
    for ex in examples:
        h.update(bytes(str(ex["input_ids"]), "ascii"))
        h.update(bytes(str(ex["labels"]), "ascii"))
    return h.hexdigest()[:16]


def fit_teacher(preset: str, tokenizer, examples: list[dict], collate, *, steps: int,
                lr: float, batch: int, seed: int, cache_dir: Path, show_progress: bool = True,
                log=print) -> Path:
    """Train `preset` with plain cross-entropy on the labelled examples, or reuse the cached
    result of an identical fit. Written to a temporary folder, then renamed into place.
    Each step's examples are packed into rows (`collate`'s pad id; no compute on padding:
    a quarter less CPU time than padded batches on the built-in data)."""
    key = cache_key(preset, examples, steps, lr, batch, seed)
    out = Path(cache_dir) / f"{preset}-{key}"
    if (out / "config.json").is_file():
        log(f"teacher: cached fit {out}")
        return out
    labelled = [ex for ex in examples if ex["n_labels"] > 0]
    if not labelled:
        raise ValueError("no labelled examples to fit the teacher on")
    model, _ = load_causal_lm(preset, tokenizer=tokenizer, seed=seed + 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.55 + 0.45 * math.cos(math.pi * min(i, steps) / steps)))  # warm-up, cosine to 0.1
    # rows twice the longest example: ~3 examples a row on the built-in data, the least
    # CPU time per step measured (width 1x: 20 % less than padded, 2x: 25 %, 3x: 15 %)
    pack = PackedCollator(collate.pad_id, 0, 2 * max(len(ex["input_ids"]) for ex in labelled))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc="fit teacher", disable=not show_progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(labelled), (batch,), generator=g).tolist()
        loss = packed_lm_loss(model, pack([labelled[i] for i in idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    final_loss = loss.item()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / FIT_FILE).write_text(json.dumps(
            {"preset": preset, "steps": steps, "lr": lr, "batch": batch, "seed": seed,
             "final_loss": final_loss, "seconds": round(time.time() - t0, 1)}, indent=2))
    replace_dir(write, out, keep_existing=True)  # another process may have finished the same fit first
    log(f"teacher: fitted {preset} in {time.time() - t0:.0f}s, final loss {final_loss:.3f}; "
        f"cached at {out}")
    return out


def packed_lm_loss(model, b: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of packed rows
    (`PackedCollator`): position t predicts label t + 1 of the same sequence only."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone_forward(backbone, b["position_ids"], input_ids=b["input_ids"])
    logits = model.get_output_embeddings()(hidden[:, :-1]).float()
    target = packed_next_targets(b["labels"], b["attention_mask"], b["seq_index"], IGNORE_INDEX)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX)
