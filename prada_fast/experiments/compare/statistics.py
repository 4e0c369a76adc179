"""The numbers of the report: a variant over its seeds, the paired per-seed differences
against plain CoT distillation (A) and against CoT + the LM term (B) with their 95 %
t-interval, PRADA's verdict against (B), and the per-layer probes before and after training."""
from __future__ import annotations

import math

from ..analysis import aggregate
from .variants import LM_BASELINE, Variant


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def summarise(runs: list[dict], v: Variant) -> dict:
    """One variant of one target over its seeds."""
    roles = runs[0]["roles"]
    out = {"label": v.label, "seeds": [r["seed"] for r in runs], "domains": {},
           "domain_head_trained": v.trains_domain_head}
    for d, role in roles.items():
        out["domains"][d] = {
            "role": role,
            "accuracy_after": aggregate(r["accuracy_after"].get(d) for r in runs),
            "accuracy_before": aggregate(r["accuracy_before"].get(d) for r in runs)}
    src = [d for d, role in roles.items() if role == "source"]
    tgt = [d for d, role in roles.items() if role == "target"]
    out["source_accuracy_after"] = aggregate(_mean([r["accuracy_after"][d] for d in src]) for r in runs)
    out["target_accuracy_after"] = aggregate(_mean([r["accuracy_after"][d] for d in tgt]) for r in runs)
    out["all_accuracy_before"] = aggregate(_mean(list(r["accuracy_before"].values())) for r in runs)
    for key in ("domain_classifier_accuracy", "probe_accuracy", "ncm_accuracy", "domain_share",
                "final_loss", "wall_seconds", "tokens_per_s"):
        out[key] = aggregate(r.get(key) for r in runs)
    for key in ("ce", "kd", "dom", "dom_acc", "lm"):
        out[f"final_{key}"] = aggregate(r["final"].get(key) for r in runs)
    out["layer_probes"] = layer_probe_summary(runs)
    out["layer_domain_share"] = per_layer(runs, lambda r: r.get("layer_domain_share"), aggregate)
    for key in ("in_head_rows", "outside"):
        out[f"head_subspace_{key}"] = aggregate((r.get("head_subspace") or {}).get(key) for r in runs)
    return out


def per_layer(runs: list, values, reduce) -> list | None:
    """reduce(the values of layer i over the runs) for every layer that all of them have;
    values(run) is a run's per-layer list (None: the run has none, and is left out). None
    when no run has one (runs reported by an older version)."""
    lists = [values(r) for r in runs]
    lists = [x for x in lists if x]
    if not lists:
        return None
    return [reduce(x[i] for x in lists) for i in range(min(map(len, lists)))]


def layer_probe_summary(runs: list[dict]) -> list[dict] | None:
    """Per layer (0: the input embeddings, last: the final states), over seeds: the fresh
    probe's accuracy on that layer's pooled question features before and after training and
    the per-seed drop (before - after: how far training moved the domain out of reach).
    None when the runs hold no layer probes (a trainer before they were added)."""
    have = [r for r in runs if r.get("layer_probes_after")]
    if not have:
        return None
    n = min(len(r["layer_probes_after"]) for r in have)
    out = []
    for i in range(n):
        before = [(r.get("layer_probes_before") or [None] * n)[i] for r in have]
        after = [r["layer_probes_after"][i] for r in have]
        out.append({"layer": i, "before": aggregate(before), "after": aggregate(after),
                    "drop": aggregate(b - a for b, a in zip(before, after)
                                      if b is not None and a is not None)})
    return out


def paired_differences(by_variant: dict[str, list[dict]], base: str = "cot") -> dict:
    """Per seed, variant minus the base variant (same seed: same student init and data order;
    the teacher and the data are those of every seed, or with --teacher-per-seed of that one)."""
    if base not in by_variant:
        return {}
    base_runs = {r["seed"]: r for r in by_variant[base]}
    out = {}
    for key, runs in by_variant.items():
        if key == base:
            continue
        diffs = {"source_accuracy_after": [], "target_accuracy_after": [], "probe_accuracy": [],
                 "domain_share": []}
        for r in runs:
            b = base_runs.get(r["seed"])
            if b is None:
                continue
            for name, fn in (("source_accuracy_after", lambda x: _mean(
                                 [x["accuracy_after"][d] for d, ro in x["roles"].items() if ro == "source"])),
                             ("target_accuracy_after", lambda x: _mean(
                                 [x["accuracy_after"][d] for d, ro in x["roles"].items() if ro == "target"])),
                             ("probe_accuracy", lambda x: x["probe_accuracy"]),
                             ("domain_share", lambda x: x.get("domain_share"))):
                a, c = fn(r), fn(b)
                if a is not None and c is not None:
                    diffs[name].append(a - c)
        out[key] = {k: _paired(v) for k, v in diffs.items()}
        # the domain share of every layer, paired the same way
        pairs = [(r.get("layer_domain_share"), base_runs[r["seed"]].get("layer_domain_share"))
                 for r in runs if r["seed"] in base_runs]
        out[key]["layer_domain_share"] = per_layer(
            [[a - b for a, b in zip(x, y)] for x, y in pairs if x and y], lambda d: d, _paired)
    return out


def _paired(differences) -> dict:
    """The mean ± std of paired differences and their 95 % t-interval."""
    vals = list(differences)
    return {**aggregate(vals), "ci95": ci95(vals)}


def verdict(paired_vs_lm: dict, variants: dict, n_arms: int | None = None,
            paired_vs_plain: dict | None = None) -> dict:
    """PRADA helps only where (C) or (D) beats (B): per PRADA arm against CoT + LM, whether
    the paired 95 % interval of the target accuracy's difference lies above 0 ("better"),
    below 0 ("worse") or holds 0 ("no difference shown"; None below 2 paired seeds), and
    "helps": whether any PRADA arm is better (None: no arm has 2 paired seeds).
    With m PRADA arms (n_arms: those the comparison planned, whether or not each has runs;
    default those here) each is also judged at the Bonferroni level 1 - 0.05 / m
    ("adjusted", "helps_adjusted"), and its seeds counted above, equal to and below (B).
    With the differences against plain CoT (A) (paired_vs_plain), each arm's call against (A)
    ("vs_plain") and (B)'s ("lm_vs_plain"): where (B) is worse than (A), beating (B) is not
    beating the better baseline."""
    def call(ci):
        return None if ci is None else \
            "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference shown"

    def vs_plain(k):  # the target's 95 % interval of k against (A), if given
        return (paired_vs_plain or {}).get(k, {}).get("target_accuracy_after", {}).get("ci95")
    prada = {k: d for k, d in paired_vs_lm.items() if variants[k].has_prompt}
    m = max(n_arms or len(prada), 1)
    level = 1 - 0.05 / m
    arms = {}
    for k, d in prada.items():
        t = d["target_accuracy_after"]
        vals = t.get("values", [])
        ci, adj = t.get("ci95"), t_interval(vals, level)
        arms[k] = {"target_ci95": ci, "source_ci95": d["source_accuracy_after"].get("ci95"),
                   "target": call(ci), "target_ci_adjusted": adj, "adjusted": call(adj),
                   "seeds_above_equal_below": [sum(x > 0 for x in vals), sum(x == 0 for x in vals),
                                               sum(x < 0 for x in vals)]}
        arms[k].update(vs_plain_ci95=vs_plain(k), vs_plain=call(vs_plain(k)))
    lm_ci = vs_plain(LM_BASELINE)
    decided = [a for a in arms.values() if a["target"] is not None]
    return {"arms": arms, "n_arms": m, "adjusted_level": level,
            "lm_vs_plain_ci95": lm_ci, "lm_vs_plain": call(lm_ci),
            "helps": any(a["target"] == "better" for a in decided) if decided else None,
            "helps_adjusted": any(a["adjusted"] == "better" for a in decided) if decided else None}


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with df (integer) degrees of freedom: Abramowitz & Stegun
    26.7.3 (df odd) and 26.7.4 (df even), finite sums in cos(theta), theta = atan(t / sqrt(df))."""
    th = math.atan(t / math.sqrt(df))
    c = math.cos(th)
    if df % 2:  # (2/pi)(theta + sin(theta)(cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...)), df - 2 the top power
        term = total = c if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (th + math.sin(th) * total)
    term = total = 1.0  # sin(theta)(1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(th) * total


def t_quantile(level: float, df: int) -> float:
    """The two-sided quantile q of Student's t: P(|T| <= q) = level (bisection)."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t quantile: level {level} must be in (0, 1) and df {df} >= 1")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(values, level: float = 0.95) -> list[float] | None:
    """The t-interval at `level` of the mean of paired differences (None below 2 values)."""
    a = aggregate(values)
    if a["n"] < 2:
        return None
    half = t_quantile(level, a["n"] - 1) * a["std"] / math.sqrt(a["n"])
    return [a["mean"] - half, a["mean"] + half]


def ci95(values) -> list[float] | None:
    """The 95 % t-interval of the mean of paired differences (None below 2 values)."""
    return t_interval(values, 0.95)
