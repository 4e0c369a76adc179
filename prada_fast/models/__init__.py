"""The model subsystem: loading causal LMs (presets, local directories), the PRADA model
(student + soft prompt + domain head), its final directory, soft-prompt encoders, the MMD
term and attention over packed rows; real pretrained presets got without a hub (hub.py:
`python -m prada_fast.models get smollm2-135m`) and layer-pruned students (prune.py)."""
from prada_fast.models.loading import (PRESETS, ModelError, byte_tokenizer, check_model_dir,
                                       check_same_vocab, load_causal_lm, pick_attention)
from prada_fast.models.config import POOLS, PradaConfig
from prada_fast.models.final import HEADS_FILE, META_FILE, PICKLED_HEADS_FILE
from prada_fast.models.prada import DomainHead, PradaModel

__all__ = ["PRESETS", "ModelError", "byte_tokenizer", "check_model_dir", "check_same_vocab",
           "load_causal_lm", "pick_attention", "HEADS_FILE", "META_FILE", "PICKLED_HEADS_FILE",
           "POOLS", "DomainHead", "PradaConfig", "PradaModel"]
