"""Where the domain lives in the student: a fresh probe's domain accuracy on the
question-pooled output of every layer of finished runs, from the input embeddings (the
words alone) to the final hidden states (the domain head's input).

    python -m prada_fast.experiments.layers RUN_DIR [RUN_DIR ...] [--folds 5] [--json FILE]

RUN_DIR is a finished training run (its run_config.json and final/); the probes use its
held-out records, encoded as in training. Chance is 1/D. A probe at 1.0 on the input
embeddings says the domains differ in their words; an adversary on the final layer can at
best make the later layers forget that."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from prada_fast.experiments.analysis import domain_variance_share, head_input, pooled_features
from prada_fast.trainer.probes import one_thread, probe_accuracy


@one_thread
def layer_probes(run_dir, *, folds: int = 5) -> dict:
    """{"layers": [{"layer": i, "logistic": acc, "ncm": acc, "domain_share": share}, ...],
    "head_subspace": {...},
    "chance": 1/D, "n": rows} for one finished run (layer 0: the input embeddings; the last:
    the final hidden states). head_subspace (a linear head only): the logistic probe on the
    head's input (the final features, or --pool-layer's) projected onto the span of its D weight rows
    ("in_head_rows", all the head can see) and onto its orthogonal complement ("outside"):
    a student that hides the domain from its head alone leaves it in "outside"."""
    feats, labels, domains, _ = pooled_features(run_dir, all_layers=True)
    rows = [{"layer": i, "logistic": probe_accuracy(f, labels, folds=folds),
             "ncm": probe_accuracy(f, labels, kind="ncm", folds=folds),
             "domain_share": domain_variance_share(f, labels)} for i, f in enumerate(feats)]
    return {"run": str(run_dir), "layers": rows,
            "head_subspace": head_subspace(run_dir, head_input(run_dir, feats), labels, folds=folds),
            "chance": 1 / len(domains), "n": len(labels)}


def head_subspace(run_dir, features: torch.Tensor, labels: torch.Tensor, *,
                  folds: int = 5) -> dict | None:
    """The logistic probe on a finished run's pooled features (the head's input) projected onto the span of
    its linear domain head's weight rows ("in_head_rows", all the head can see) and onto the
    orthogonal complement ("outside"), and the head's rank; None for a head with a hidden layer."""
    from prada_fast.models import PradaModel

    head = PradaModel.load_heads(Path(run_dir) / "final")["domain_head"]
    if "inner.weight" in head:
        return None
    inside, outside = split_by_rows(features, head["out.weight"])
    return {"in_head_rows": probe_accuracy(inside, labels, folds=folds),
            "outside": probe_accuracy(outside, labels, folds=folds),
            "rank": int(torch.linalg.matrix_rank(head["out.weight"]))}


def split_by_rows(features: torch.Tensor, weight: torch.Tensor):
    """(features projected onto the row space of weight (D x H), onto its orthogonal
    complement): the two parts add up to the features."""
    w = weight.to(torch.float64)
    _, sv, vh = torch.linalg.svd(w, full_matrices=False)
    # the rank at the weight's own precision (a float32 head's rounding is not a direction)
    r = int((sv > sv.max() * max(w.shape) * torch.finfo(weight.dtype).eps).sum())
    basis = vh[:r].T  # H x r, orthonormal
    x = features.to(torch.float64)
    inside = x @ basis @ basis.T
    return inside, x - inside


def table(results: list[dict]) -> str:
    """A markdown table: one row per layer, logistic / nearest-mean accuracy / domain share per run."""
    def f(x):
        return "–" if x is None else f"{x:.3f}"
    n_layers = max(len(r["layers"]) for r in results)
    head = "| layer | " + " | ".join(Path(r["run"]).as_posix() for r in results) + " |"
    lines = [head, "| --- |" + " --- |" * len(results)]
    for i in range(n_layers):
        name = "0 (embeddings)" if i == 0 else (f"{i} (final)" if i == n_layers - 1 else str(i))
        cells = [f"{f(r['layers'][i]['logistic'])} / {f(r['layers'][i]['ncm'])} / "
                 f"{f(r['layers'][i]['domain_share'])}"
                 if i < len(r["layers"]) else "" for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    subs = [r.get("head_subspace") for r in results]
    if any(subs):
        lines.append("| final, in the head's rows | " + " | ".join(
            f(s["in_head_rows"]) if s else "–" for s in subs) + " |")
        lines.append("| final, outside them | " + " | ".join(
            f(s["outside"]) if s else "–" for s in subs) + " |")
    lines.append(f"\nlogistic / nearest-mean probe accuracy ({results[0]['n']} held-out questions, "
                 f"chance {results[0]['chance']:.3f}) / the share of the features' variance between "
                 "the domain means (0: none, 1: all; it still moves when both probes are at 1.0); "
                 "the last two rows: the logistic probe on the "
                 "final features split into the span of the domain head's weight rows and the rest")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prada_fast.experiments.layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished training runs")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of each probe (default: 5)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    for r in a.runs:
        if not (Path(r) / "run_config.json").is_file() or not (Path(r) / "final").is_dir():
            p.error(f"{r}: not a finished run (no run_config.json or final/)")
    results = [layer_probes(r, folds=a.folds) for r in a.runs]
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
