"""Loading causal LMs: a preset (a Llama- or Qwen-shaped config with random weights, seeded,
and a byte-level tokenizer: no download) or a local Hugging Face model directory, checked
before transformers reads it so that a bad one is named in one line."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Llama-shaped presets small enough to train on a CPU in minutes. Vocabulary: bytes.
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4),
    "tiny-teacher": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=6),
    # the shapes of Qwen2.5-0.5B and -1.5B (random weights): tied embeddings, as theirs
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SAFE_WEIGHT_FILES = WEIGHT_FILES[:2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


class ModelError(ValueError):
    """A model argument that cannot be honoured (bad path, vocabulary mismatch...)."""


def byte_tokenizer():
    """A byte-level tokenizer that needs no download (259 ids: pad 0, eos 1, unk 2, bytes)."""
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer(extra_ids=0)


def pick_attention(requested: str = "auto") -> str:
    """flash_attention_2 where flash-attn imports on CUDA, else PyTorch's SDPA; or as asked."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:240] if text else ''}".rstrip(": ")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def check_model_dir(name_or_path: str, *, tokenizer: bool = True, safetensors_only: bool = False) -> None:
    """Check a local Hugging Face model directory without loading it: config.json readable
    with a model_type transformers knows, the weight files (every shard an index lists),
    and, when `tokenizer`, tokenizer files. Raises ModelError naming the directory and
    what is missing. safetensors_only: pickled weights (pytorch_model.bin) are refused."""
    path = Path(name_or_path)
    if not path.is_dir():
        from .hub import real_preset_help
        raise ModelError(f"model {name_or_path!r}: not a preset ({', '.join(PRESETS)}, "
                         f"{real_preset_help()}) and not a local model directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path}: no config.json (not a Hugging Face model directory)")
    cfg = _read_json(path / "config.json")
    from transformers import CONFIG_MAPPING, __version__
    if "model_type" not in cfg:
        raise ModelError(f"{path / 'config.json'}: no model_type field")
    if cfg["model_type"] not in CONFIG_MAPPING:
        raise ModelError(f"{path / 'config.json'}: model_type {cfg['model_type']!r} is unknown to "
                         f"transformers {__version__}")
    names = SAFE_WEIGHT_FILES if safetensors_only else WEIGHT_FILES
    present = [n for n in names if (path / n).is_file()]
    if not present:
        pickled = [n for n in WEIGHT_FILES[2:] if (path / n).is_file()]
        if safetensors_only and pickled:
            raise ModelError(f"model directory {path}: holds {pickled[0]} (a pickle) and no "
                             "model.safetensors: refusing to load pickled weights here")
        raise ModelError(f"model directory {path}: no weights ({' or '.join(names)})")
    for index in (n for n in present if n.endswith(".index.json")):
        weight_map = _read_json(path / index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{path / index}: no weight_map")
        missing = sorted({s for s in weight_map.values() if not (path / s).is_file()})
        if missing:
            raise ModelError(f"model directory {path}: weight shard {missing[0]} (listed in {index}) "
                             f"is missing{f', and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    if tokenizer and not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise ModelError(f"model directory {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def load_causal_lm(name_or_path: str, *, tokenizer=None, attn: str = "auto", dtype=None,
                   seed: int = 0, config_overrides: dict | None = None, safetensors_only: bool = False):
    """A preset name (built from a config with random weights, seeded), a real preset
    (models/hub.py: pretrained weights, converted into a cached directory on first use) or a
    local Hugging Face model directory (`from_pretrained`). Returns (model, tokenizer).

    config_overrides: fields set on top of a preset's config (e.g. {"vocab_size": 32000}:
    the benchmarks' larger vocabulary for the byte-vocabulary presets); presets only.
    A directory transformers cannot read raises ModelError naming it and what is wrong
    (`check_model_dir`, then the first line of what transformers raised);
    safetensors_only: refuse pickled weights."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    attn = pick_attention(attn)
    if name_or_path in PRESETS:
        tok = tokenizer or byte_tokenizer()
        spec = dict(max_position_embeddings=1024, tie_word_embeddings=False, vocab_size=len(tok),
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.eos_token_id)
        spec.update(PRESETS[name_or_path])
        spec.update(config_overrides or {})
        cfg = AutoConfig.for_model("qwen2" if "qwen" in name_or_path else "llama", **spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn,
                                                     dtype=dtype or torch.float32)
        return model, tok
    from .hub import resolve_model  # real presets (smollm2-135m[-lK]): a directory, got once
    name_or_path = resolve_model(name_or_path)
    path = Path(name_or_path)
    check_model_dir(name_or_path, tokenizer=tokenizer is None, safetensors_only=safetensors_only)
    if config_overrides:
        raise ModelError(f"model {name_or_path!r}: config overrides apply to presets only")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn, dtype=dtype or torch.float32,
            use_safetensors=True if safetensors_only else None)
        tok = tokenizer or AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or foreign files
        raise ModelError(f"model directory {path}: transformers cannot load it ({_first_line(e)})") from e
    return model, tok


def _vocab_size(model) -> int:
    """Rows of the output head (its full shape under ZeRO-3, where `shape` is a partition's)."""
    w = model.get_output_embeddings().weight
    return (getattr(w, "ds_shape", None) or w.shape)[0]


def check_same_vocab(student, teacher) -> None:
    vs, vt = _vocab_size(student), _vocab_size(teacher)
    if vs != vt:
        raise ModelError(f"teacher vocabulary ({vt} ids) differs from the student's ({vs} ids): "
                         "distillation needs the same tokenizer")
