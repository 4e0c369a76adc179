"""The numbers of the report: a variant over its seeds, the paired per-seed differences
against plain CoT distillation (A) and against CoT + the LM term (B) with their 95 %
t-interval, PRADA's verdict against (B), and the per-layer probes before and after training."""
from __future__ import annotations

import math

from ..analysis import aggregate
from .variants import Variant


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


def verdict(paired_vs_lm: dict, variants: dict) -> dict:
    """PRADA helps only where (C) or (D) beats (B): per PRADA arm against CoT + LM, whether
    the paired 95 % interval of the target accuracy's difference lies above 0 ("better"),
    below 0 ("worse") or holds 0 ("no difference shown"; None below 2 paired seeds), and
    "helps": whether any PRADA arm is better (None: no arm has 2 paired seeds)."""
    arms = {}
    for k, d in paired_vs_lm.items():
        if not variants[k].has_prompt:
            continue
        ci = d["target_accuracy_after"].get("ci95")
        arms[k] = {"target_ci95": ci, "source_ci95": d["source_accuracy_after"].get("ci95"),
                   "target": None if ci is None else
                   "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference shown"}
    decided = [a for a in arms.values() if a["target"] is not None]
    return {"arms": arms, "helps": any(a["target"] == "better" for a in decided) if decided else None}


# two-sided 97.5 % quantiles of Student's t, by degrees of freedom (1..30); 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ci95(values) -> list[float] | None:
    """The 95 % t-interval of the mean of paired differences (None below 2 values)."""
    a = aggregate(values)
    if a["n"] < 2:
        return None
    t = T975[a["n"] - 2] if a["n"] - 1 <= len(T975) else 1.96
    half = t * a["std"] / math.sqrt(a["n"])
    return [a["mean"] - half, a["mean"] + half]
