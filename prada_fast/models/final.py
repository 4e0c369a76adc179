"""DIR/final: the trained student as a Hugging Face model directory, plus the soft prompt
and the domain head, gathered from ZeRO-3 partitions one parameter at a time, and the
model's settings. A prompt encoder (P-tuning) is not saved: its output is, as the soft
prompt's plain vectors. Written by `export_final`, read back by `load_final`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from prada_fast.models.config import PradaConfig
from prada_fast.models.loading import ModelError, _first_line, _read_json, load_causal_lm
from prada_fast.models.prada import PradaModel

HEADS_FILE = "prada_heads.safetensors"   # soft prompt, domain head: our own tensors, no pickle
PICKLED_HEADS_FILE = "prada_heads.pt"     # what earlier versions wrote; refused, never unpickled
META_FILE = "prada_config.json"           # PradaConfig's fields, the run's domains and roles


def gather_state(module, rank0: bool) -> dict:
    """Full tensors of `module`'s parameters, gathered one at a time (ZeRO-3), on rank 0."""
    from deepspeed import zero
    out = {}
    for name, p in module.named_parameters():
        with zero.GatheredParameters([p], modifier_rank=None):
            if rank0:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def baked_prompt(model: PradaModel, rank0: bool):
    """The soft prompt as plain (K, H) vectors on rank 0: a P-tuning encoder's output
    computed once from the gathered free vectors and encoder weights (None without one)."""
    from deepspeed import zero
    if model.soft_prompt is None:
        return None
    encoder = model.prompt_encoder
    params = [model.soft_prompt, *(encoder.parameters() if encoder is not None else ())]
    with zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        return model.prompt_vectors().detach().to("cpu", copy=True) if rank0 else None


def export_final(model: PradaModel, tok, out_dir: Path, run_meta: dict, rank0: bool = True) -> None:
    """DIR/final: the student as a Hugging Face model directory plus soft prompt and head,
    and prada_config.json: the model's PradaConfig fields plus `run_meta` (the run's
    "domains" and their "roles"). Every rank takes part in the gathers (ZeRO-3); rank 0
    (`rank0`) writes."""
    meta = {**run_meta, **model.prada_config.to_meta()}
    student_sd = gather_state(model.student, rank0)
    heads_sd = gather_state(model.domain_head, rank0)
    prompt = baked_prompt(model, rank0)
    if rank0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.student.save_pretrained(tmp, state_dict=student_sd)
        tok.save_pretrained(tmp)
        save_heads(tmp, {"soft_prompt": prompt, "domain_head": heads_sd}, meta)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)


def save_heads(out_dir: str | os.PathLike, state: dict, meta: dict) -> None:
    """Write what `load_final` reads besides the Hugging Face student: the tensors of
    `state` ({"soft_prompt": tensor or None, "domain_head": state dict, ...}) as
    safetensors (keys "soft_prompt", "domain_head.out.weight", ...), and `meta` as JSON."""
    from safetensors.torch import save_file
    flat = {}
    for name, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        elif value is not None:
            flat[name] = value
    save_file({k: v.detach().to("cpu").contiguous() for k, v in flat.items()},
              str(Path(out_dir) / HEADS_FILE), metadata={"format": "pt"})
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2))


def load_heads(path: str | os.PathLike) -> dict:
    """The tensors `save_heads` wrote, nested as given to it. A pickle is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    file = path / HEADS_FILE
    if not file.is_file():
        if (path / PICKLED_HEADS_FILE).is_file():
            raise ModelError(f"{path / PICKLED_HEADS_FILE}: a pickle (an older prada_fast, or "
                             "not ours); loading it could run any code, so it is refused: "
                             f"re-export the run, which writes {HEADS_FILE}")
        raise ModelError(f"{path}: no {HEADS_FILE} (not a prada_fast final/ directory)")
    try:
        flat = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{file}: not a readable safetensors file ({_first_line(e)})") from e
    state: dict = {}
    for key, value in flat.items():
        name, dot, rest = key.partition(".")
        if dot:
            state.setdefault(name, {})[rest] = value
        else:
            state[name] = value
    return state


def load_final(path: str | os.PathLike, attn: str = "auto", loss_impl: str = "auto"):
    """(model, tokenizer, saved metadata) of DIR/final: the Hugging Face student plus soft
    prompt and domain head, built from the saved PradaConfig (`PradaConfig.from_meta`: a
    prompt encoder used in training is baked into the saved vectors)."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise ModelError(f"{path}: no {META_FILE} (not a prada_fast final/ directory)")
    meta = _read_json(path / META_FILE)
    state = load_heads(path)  # before the student: a pickle is refused at once
    student, tok = load_causal_lm(str(path), attn=attn, safetensors_only=True)
    model = PradaModel(student, PradaConfig.from_meta(meta, loss_impl))
    if model.soft_prompt is not None:
        model.soft_prompt.data.copy_(state["soft_prompt"])
    model.domain_head.load_state_dict(state["domain_head"])
    return model, tok, meta


def is_final(name_or_path: str | os.PathLike) -> bool:
    """Whether a --model names a run's final/ directory (it holds prada_config.json)."""
    return (Path(name_or_path) / META_FILE).is_file()


def check_model(name_or_path: str) -> None:
    """Check a model to evaluate without loading it: a preset, a real preset (got on first
    use; a bad K raises), a run's final/ directory (safetensors only) or a local model
    directory with its tokenizer; ModelError names it."""
    from prada_fast.models.hub import parse_real
    from prada_fast.models.loading import PRESETS, check_model_dir
    if name_or_path in PRESETS or parse_real(name_or_path):
        return
    check_model_dir(name_or_path, tokenizer=True, safetensors_only=is_final(name_or_path))


def load_any(name_or_path: str, *, attn: str = "auto", seed: int = 0):
    """(model, tokenizer, the final/ metadata or None): a run's final/ directory as the
    PradaModel it saved (soft prompt applied), else a preset (seeded random weights) or a
    local causal LM directory (load_causal_lm)."""
    if is_final(name_or_path):
        return load_final(name_or_path, attn=attn)
    model, tok = load_causal_lm(name_or_path, attn=attn, seed=seed)
    return model, tok, None
