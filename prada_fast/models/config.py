"""`PradaConfig`: the PRADA model's settings (everything `PradaModel` takes besides the
student), as one frozen, checked object. The trainer builds it from its flags, the model
is built from it, and DIR/final/prada_config.json holds its fields (plus the run's domains
and their roles), which `from_final` reads back."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from prada_fast.models.loading import ModelError
from prada_fast.models.prompts import PROMPT_ENCODERS
from prada_fast.op import IMPL_NAMES as LOSS_IMPLS

POOLS = ("question", "sequence")
HEADS = ("linear", "mlp")
ADVERSARIES = ("grl", "confusion", "mmd")  # the op's two, and MMD (models/mmd.py)
PROMPT_INITS = ("random", "vocab")  # the soft prompt's start: Gaussian, or token embeddings
# What a prada_config.json written before a key existed meant by its absence (read by
# `from_meta`): older exports pooled whole sequences and reversed gradients.
LEGACY_DEFAULTS = {"mlp_hidden": 0, "pool": "sequence", "adversary": "grl",
                   "prompt_encoder": "none", "prompt_hidden": 0, "pool_layer": None,
                   "prompt_init": "random"}


@dataclass(frozen=True)
class PradaConfig:
    """The PRADA model's settings; the defaults are the trainer's flags' defaults."""

    n_domains: int                  # D: classes of the domain head
    n_prompt: int = 8               # K: soft-prompt vectors in front of the input (0: none)
    head: str = "linear"            # the domain head: "linear" | "mlp"
    mlp_hidden: int = 0             # the MLP head's hidden width (0: the student's hidden size)
    loss_impl: str = "auto"         # the loss op's implementation (prada_fast.op)
    pool: str = "question"          # what the domain features average over: POOLS
    adversary: str = "confusion"    # "grl" | "confusion" (the op's) | "mmd" (the head only watches)
    prompt_encoder: str = "none"    # P-tuning reparametrisation while training (prompts.py)
    prompt_hidden: int = 0          # its hidden width (0: the student's hidden size)
    pool_layer: int | None = None   # the domain features pool decoder layer L's output (0: the
                                    # input embeddings); None: the final normed hidden states
    prompt_init: str = "random"     # the soft prompt's start: PROMPT_INITS

    def __post_init__(self):
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ModelError(msg)
        check(self.pool in POOLS, f"pool {self.pool!r}: expected one of {POOLS}")
        check(self.head in HEADS, f"domain head {self.head!r}: expected 'linear' or 'mlp'")
        check(self.adversary in ADVERSARIES, f"adversary {self.adversary!r}: expected one of {ADVERSARIES}")
        check(self.loss_impl in LOSS_IMPLS, f"loss impl {self.loss_impl!r}: expected one of {LOSS_IMPLS}")
        check(self.prompt_init in PROMPT_INITS,
              f"prompt init {self.prompt_init!r}: expected one of {PROMPT_INITS}")
        check(self.prompt_encoder in PROMPT_ENCODERS,
              f"prompt encoder {self.prompt_encoder!r}: expected one of {PROMPT_ENCODERS}")
        for name in ("n_prompt", "mlp_hidden", "prompt_hidden"):
            check(int(getattr(self, name)) >= 0, f"{name} {getattr(self, name)}: must be >= 0")
        check(self.pool_layer is None or int(self.pool_layer) >= 0,
              f"pool_layer {self.pool_layer}: must be >= 0")
        check(int(self.n_domains) >= 1, f"n_domains {self.n_domains}: must be >= 1")
        check(self.prompt_encoder == "none" or self.n_prompt > 0,
              f"prompt encoder {self.prompt_encoder!r} needs a soft prompt (n_prompt >= 1)")

    def to_meta(self) -> dict:
        """The fields as prada_config.json holds them (`from_meta` reads them back)."""
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, loss_impl: str = "auto") -> PradaConfig:
        """The config of a model loaded from final/: the saved fields (an older file's: its
        keys, LEGACY_DEFAULTS for those it lacks), with `loss_impl` (a choice of the
        machine that loads it) and no prompt encoder (the export baked its output into the
        soft prompt's plain vectors)."""
        saved = {**LEGACY_DEFAULTS, **{f.name: meta[f.name] for f in fields(cls) if f.name in meta}}
        saved.setdefault("n_domains", len(meta["domains"]))
        saved.setdefault("head", meta.get("domain_head"))  # the key older versions wrote
        return cls(**{**saved, "loss_impl": loss_impl, "prompt_encoder": "none", "prompt_hidden": 0})
