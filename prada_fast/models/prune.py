"""A layer-pruned student made from a pretrained model, the way DistilBERT made its
student from BERT (Sanh et al., 2019: every other layer of the teacher, same width):

    keep_layers(30, 8) -> [0, 4, 8, 12, 17, 21, 25, 29]

Which layers: K evenly spaced decoder layers, always the first and the last. The first
turns the token embeddings into the residual stream every later layer reads, and the last
writes what the final norm and the (tied) LM head were trained to read; the layers between
are sampled evenly so that each kept one stands for about as many removed neighbours, and
the residual stream it receives has been through a comparable share of the depth. With
K = L/2 this is close to DistilBERT's every other layer. Everything else is the source's:
embeddings, final norm, LM head (or the tied embeddings), tokenizer, chat template, so the
student shares the teacher's vocabulary and KD works token by token.

The weights are copied tensor by tensor from the source's safetensors (no model is built):
layer keep[j] of the source becomes layer j of the student."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .hub import SOURCE_FILE, ModelError, _publish, _tmp_dir, sha256_file

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<i>\d+)(?P<post>\..*)$")
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
          "merges.txt", "tokenizer.model", "added_tokens.json")


def keep_layers(total: int, k: int) -> list[int]:
    """K of `total` layer indices, evenly spaced, first and last included (K=1: the first)."""
    if not 1 <= k <= total:
        raise ModelError(f"keep {k} of {total} layers: K must be in 1..{total}")
    if k == 1:
        return [0]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


def prune_state(state: dict, keep: list[int]) -> dict:
    """The tensors of `state` with decoder layer keep[j] renamed to layer j and the other
    layers dropped; tensors outside the layers (embeddings, norm, head) unchanged."""
    new_index = {old: j for j, old in enumerate(keep)}
    out = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
        elif int(m["i"]) in new_index:
            out[f"{m['pre']}{new_index[int(m['i'])]}{m['post']}"] = t
    return out


def prune_model_dir(src: str | os.PathLike, out: str | os.PathLike, keep: list[int]) -> Path:
    """Write the student with layers `keep` of the Hugging Face directory `src` (a single
    model.safetensors) to `out`, atomically; config.json says num_hidden_layers=len(keep),
    SOURCE_FILE notes the source and the layers kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, out = Path(src), Path(out)
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{src}: no model.safetensors to prune (a single-file model is needed)")
    cfg = json.loads((src / "config.json").read_text())
    total = cfg.get("num_hidden_layers")
    if not isinstance(total, int) or not keep or min(keep) < 0 or max(keep) >= total \
            or sorted(set(keep)) != list(keep):
        raise ModelError(f"{src}: cannot keep layers {keep} of {total}")
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    pruned = prune_state(state, keep)
    cfg["num_hidden_layers"] = len(keep)
    for field in ("layer_types",):  # per-layer lists, if the config has them
        if isinstance(cfg.get(field), list) and len(cfg[field]) == total:
            cfg[field] = [cfg[field][i] for i in keep]
    src_note = json.loads((src / SOURCE_FILE).read_text()) if (src / SOURCE_FILE).is_file() else {}
    tmp = _tmp_dir(out)
    try:
        save_file({k: v.contiguous() for k, v in pruned.items()}, str(tmp / "model.safetensors"),
                  metadata={**meta, "format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name in COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        note = {**src_note, "pruned_from": str(src), "layers_kept": keep,
                "source_layers": total,
                "sha256": src_note.get("sha256") or sha256_file(weights),
                "parameters": sum(v.numel() for k, v in pruned.items()
                                  if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight"))}
        (tmp / SOURCE_FILE).write_text(json.dumps(note, indent=2) + "\n")
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
