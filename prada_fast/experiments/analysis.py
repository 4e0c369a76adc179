"""Numbers behind the comparison report: aggregation over seeds, the pooled student
features of a finished run, their PCA and a domain probe on them, and the loss curves."""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
from pathlib import Path

import torch

from prada_fast.distributed import torch_threads


def _one_thread(fn):
    """Run `fn` on one intra-op thread: its matrices are tiny, and on a busy machine the
    OpenMP hand-offs of several threads make them 100x slower (seconds instead of ms)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------- aggregation


def aggregate(values) -> dict:
    """Mean and sample standard deviation (n - 1 in the denominator) of the values that are
    not None; std is 0.0 for a single value, and mean/std are None when there is none."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": vals}


# ----------------------------------------------------------------------------- PCA


@_one_thread
def pca_2d(x: torch.Tensor, k: int = 2):
    """Principal components of the rows of `x` (n x H) by SVD of the centred data, in float64.

    Returns (coords (n x k), components (k x H, unit rows), explained variance ratio (k,)).
    Each component's sign is fixed so that its largest-magnitude entry is positive, which
    makes the result deterministic."""
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_2d needs an (n >= 2) x H matrix, got shape {tuple(x.shape)}")
    xc = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(k, vh.shape[0])
    comps = vh[:k].clone()
    idx = comps.abs().argmax(1)
    signs = torch.sign(comps[torch.arange(k), idx])
    signs[signs == 0] = 1
    comps *= signs.unsqueeze(1)
    var = s.pow(2)
    ratio = var[:k] / var.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return xc @ comps.T, comps, ratio


# ----------------------------------------------------------------------------- probes


def _folds(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Stratified fold id of each row: each class shuffled, then dealt round-robin."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % k
    return fold


def _standardise(train: torch.Tensor, test: torch.Tensor):
    mu, sd = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    return (train - mu) / sd, (test - mu) / sd


def _logistic_predict(xtr, ytr, xte, n_classes: int, l2: float) -> torch.Tensor:
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (xte @ w.detach() + b.detach()).argmax(1)


def _ncm_predict(xtr, ytr, xte, n_classes: int) -> torch.Tensor:
    means = torch.stack([xtr[ytr == c].mean(0) if (ytr == c).any()
                         else torch.full_like(xtr[0], float("inf")) for c in range(n_classes)])
    return torch.cdist(xte, means).argmin(1)


@_one_thread
def probe_accuracy(features, labels, *, kind: str = "logistic", folds: int = 5, l2: float = 1e-2,
                   seed: int = 0) -> float | None:
    """Cross-validated accuracy of a fresh domain probe on pooled features (chance 1/D).

    kind "logistic": multinomial logistic regression (L2 `l2` on the weights, LBFGS) on
    standardised features; "ncm": nearest class mean (Euclidean, standardised features).
    Stratified `folds`-fold cross-validation, reduced to the smallest class size; None when
    a class has fewer than 2 rows or there is only one class."""
    x = torch.as_tensor(features).to(torch.float64)
    y = torch.as_tensor(labels).to(torch.long)
    classes, counts = y.unique(return_counts=True)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        return None
    n_classes = int(y.max()) + 1
    fold = _folds(y, k, seed)
    right = 0
    for f in range(k):
        tr, te = fold != f, fold == f
        xtr, xte = _standardise(x[tr], x[te])
        if kind == "logistic":
            pred = _logistic_predict(xtr, y[tr], xte, n_classes, l2)
        elif kind == "ncm":
            pred = _ncm_predict(xtr, y[tr], xte, n_classes)
        else:
            raise ValueError(f"unknown probe {kind!r}: expected 'logistic' or 'ncm'")
        right += int((pred == y[te]).sum())
    return right / len(y)


# ----------------------------------------------------------------------------- run outputs


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (empty when absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_curves(runs: list[list[dict]], keys=("ce", "kd", "dom")) -> dict:
    """Per key, the steps logged by every run and the mean and std (over runs) there."""
    if not runs:
        return {}
    by_step = [{r["step"]: r for r in rows} for rows in runs]
    steps = sorted(set.intersection(*[set(rows) for rows in by_step]))
    out = {"step": steps}
    for key in keys:
        per_step = [[rows[s].get(key) for rows in by_step] for s in steps]
        aggs = [aggregate(v) for v in per_step]
        out[key] = {"mean": [a["mean"] for a in aggs], "std": [a["std"] for a in aggs]}
    return out


def held_out_records(run_config: dict):
    """The held-out records of a finished run, exactly as the trainer chose and encoded
    them (from its run_config.json): (records, domains, args)."""
    from prada_fast.train import hold_out, load_records
    args = argparse.Namespace(**run_config)
    records, _ = load_records(args)
    domains = sorted({r.domain for r in records})
    _, held_out = hold_out(records, args.eval_per_domain, args.seed)
    return held_out, domains, args


@torch.no_grad()
def pooled_features(run_dir: str | Path, *, batch_size: int = 64, device: str | None = None):
    """Pooled student features (masked mean of the final hidden states over every non-pad
    position, soft prompt included: the domain head's input) of the run's held-out records of
    every domain, encoded as in training (target-domain records without the answer).

    Returns (features float32 (n x H), domain ids (n,), domains, roles)."""
    from prada_fast.data import Collator
    from prada_fast.model import PradaModel
    from prada_fast.train import encode_all

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    records, domains, args = held_out_records(config)
    if not records:
        raise ValueError(f"{run_dir}: no held-out records (--eval-per-domain 0?)")
    model, tok, meta = PradaModel.from_final(run_dir / "final", attn="sdpa")
    if list(meta["domains"]) != domains:
        raise ValueError(f"{run_dir}: domains {domains} differ from the model's {meta['domains']}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    examples, _ = encode_all(records, tok, args, {d: i for i, d in enumerate(domains)})
    collate = Collator(tok.pad_token_id)
    feats, labels = [], []
    # on the CPU one thread: robust on cores shared with other jobs (see _one_thread)
    with torch_threads(1) if dev.type == "cpu" else contextlib.nullcontext():
        for s in range(0, len(examples), batch_size):
            b = collate(examples[s:s + batch_size])
            f = model.pooled_features(b["input_ids"].to(dev), b["attention_mask"].to(dev),
                                      b["labels"].to(dev))
            feats.append(f.float().cpu())
            labels.append(b["domain_labels"])
    return torch.cat(feats), torch.cat(labels), domains, meta.get("roles", {})
