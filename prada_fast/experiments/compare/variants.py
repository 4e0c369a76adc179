"""The compared trainer configurations: plain CoT distillation, each adversary alone,
and PRADA with each adversary; the knobs the protocol chooses become trainer flags."""
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


ADVERSARIES = ("grl", "confusion")


VARIANT_KEYS = ("cot", "grl", "confusion", "prada-grl", "prada-confusion")


def variants(prompt_len: int) -> dict[str, Variant]:
    """The compared trainer configurations. The knobs the protocol chooses (lambda_max, the
    head's lr multiplier, the prompt encoder) are added by `knob_flags`."""
    out = {"cot": Variant("cot", "(a) plain CoT distillation", "(a) CoT-KD",
                          ("--prompt-len", "0", "--no-domain-loss"), False)}
    for i, adv in enumerate(ADVERSARIES):
        out[adv] = Variant(adv, f"({'bc'[i]}) adversarial only ({adv})", f"({'bc'[i]}) {adv}",
                           ("--prompt-len", "0", "--adversary", adv), True)
    for i, adv in enumerate(ADVERSARIES):
        out[f"prada-{adv}"] = Variant(
            f"prada-{adv}", f"({'de'[i]}) PRADA (soft prompt K={prompt_len} + {adv})",
            f"({'de'[i]}) PRADA {adv}", ("--prompt-len", str(prompt_len), "--adversary", adv),
            True, True)
    return out


def knob_flags(v: Variant, knobs: dict) -> list[str]:
    """Trainer flags of the chosen knobs that apply to variant v."""
    if not v.trains_domain_head:
        return []
    a = ["--lambda-max", str(knobs["lambda_max"]), "--domain-head-lr-mult", str(knobs["head_lr_mult"])]
    if v.has_prompt:
        a += ["--prompt-encoder", knobs["prompt_encoder"]]
    return a
