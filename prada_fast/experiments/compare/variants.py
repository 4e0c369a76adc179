"""The compared trainer configurations (the arms): plain CoT distillation (A), CoT with the
auxiliary language-model term on every domain's questions (B: the baseline that uses the
target's unlabelled text without an adversary), each adversary alone, PRADA with each
adversary (C) and PRADA with the LM term (D). The knobs the protocol chooses become
trainer flags (`knob_flags`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    short: str
    flags: tuple[str, ...]
    trains_domain_head: bool
    has_prompt: bool = False
    lm: bool = False          # the auxiliary LM term on the questions (--lm-weight, a knob)


ADVERSARIES = ("grl", "confusion")

# every key, in the report's order; the arms of the fair test are cot (A), cot-lm (B),
# prada-<adv> (C) and prada-<adv>-lm (D)
VARIANT_KEYS = ("cot", "cot-lm", "grl", "confusion", "prada-grl", "prada-confusion",
                "prada-grl-lm", "prada-confusion-lm")

# the default arms: (A), (B), (C) and (D) with the default adversary (confusion)
DEFAULT_VARIANTS = ("cot", "cot-lm", "prada-confusion", "prada-confusion-lm")

BASELINE, LM_BASELINE = "cot", "cot-lm"


def variants(prompt_len: int) -> dict[str, Variant]:
    """The compared trainer configurations, by key. The knobs the protocol chooses
    (lambda_max, the head's lr multiplier, the prompt encoder, the LM weight) are added by
    `knob_flags`."""
    no_dom = ("--prompt-len", "0", "--no-domain-loss")
    out = {"cot": Variant("cot", "(A) plain CoT distillation", "(A) CoT-KD", no_dom, False),
           "cot-lm": Variant("cot-lm", "(B) CoT + LM term on all questions", "(B) CoT+LM", no_dom,
                             False, lm=True)}
    for adv in ADVERSARIES:
        out[adv] = Variant(adv, f"adversarial only ({adv})", f"adv {adv}",
                           ("--prompt-len", "0", "--adversary", adv), True)
    for lm, letter in ((False, "C"), (True, "D")):
        for adv in ADVERSARIES:
            key = f"prada-{adv}" + ("-lm" if lm else "")
            out[key] = Variant(
                key, f"({letter}) PRADA (soft prompt K={prompt_len} + {adv})" + (" + LM term" if lm else ""),
                f"({letter}) PRADA {adv}" + ("+LM" if lm else ""),
                ("--prompt-len", str(prompt_len), "--adversary", adv), True, True, lm)
    return {k: out[k] for k in VARIANT_KEYS}


def adversary_of(v: Variant) -> str | None:
    """The adversary a variant trains with (None: no domain loss)."""
    return v.flags[v.flags.index("--adversary") + 1] if "--adversary" in v.flags else None


def knob_flags(v: Variant, knobs: dict) -> list[str]:
    """Trainer flags of the chosen knobs that apply to variant v."""
    a = []
    if v.trains_domain_head:
        a += ["--lambda-max", str(knobs["lambda_max"]), "--domain-head-lr-mult", str(knobs["head_lr_mult"])]
        if knobs.get("domain_steps"):  # 0 (joint) adds nothing: earlier runs' commands stay the same
            a += ["--domain-steps", str(knobs["domain_steps"])]
    if v.has_prompt:
        a += ["--prompt-encoder", knobs["prompt_encoder"]]
    if v.lm:
        a += ["--lm-weight", str(knobs["lm_weight"])]
    return a
