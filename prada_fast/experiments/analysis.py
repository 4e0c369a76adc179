"""Numbers behind the comparison report: aggregation over seeds, the pooled student
features of a finished run, their PCA and a domain probe on them, and the loss curves."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from prada_fast.common.distributed import torch_threads
from prada_fast.models.final import META_FILE
from prada_fast.trainer.probes import one_thread, probe_accuracy  # noqa: F401 (probe_accuracy: re-exported)
from prada_fast.trainer.rundir import RunDir
from prada_fast.trainer.settings import held_out_records


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


@one_thread
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


# ----------------------------------------------------------------------------- domain share


def domain_variance_share(x: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of the rows' total variance that lies between the domain means (the
    multivariate R^2 of the domain, in float64): sum_d n_d |mu_d - mu|^2 / sum_i |x_i - mu|^2.
    0: the domain means coincide; 1: every row sits at its domain's mean. Where a probe is at
    1.0 for every model (separable domains), this still says how much of the features is domain."""
    x = torch.as_tensor(x).to(torch.float64)
    labels = torch.as_tensor(labels)
    if x.ndim != 2 or x.shape[0] != labels.shape[0] or x.shape[0] < 2:
        raise ValueError(f"domain_variance_share needs an (n >= 2) x H matrix and n labels, got "
                         f"{tuple(x.shape)} and {tuple(labels.shape)}")
    mu = x.mean(0)
    total = (x - mu).pow(2).sum()
    between = sum((labels == d).sum() * (x[labels == d].mean(0) - mu).pow(2).sum()
                  for d in labels.unique())
    return float(between / total) if total > 0 else 0.0


# ----------------------------------------------------------------------------- run outputs


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (empty when absent)."""
    path = RunDir(Path(run_dir)).metrics
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


@torch.no_grad()
def pooled_features(run_dir: str | Path, *, batch_size: int = 64, device: str | None = None,
                    all_layers: bool = False):
    """Pooled student features (the final hidden states averaged over the model's pool mask,
    the question's tokens: the domain head's input) of the run's held-out records of every
    domain, encoded as in training (target-domain records without the answer).
    all_layers: the same pooling of every layer's output instead, (L + 1, n, H): the input
    embeddings first, the final (normed) hidden states last.

    Returns (features float32 (n x H), domain ids (n,), domains, roles)."""
    from prada_fast.data import Collator
    from prada_fast.models import PradaModel
    from prada_fast.data.prepare import encode_all

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    run_dir = Path(run_dir)
    config = json.loads(RunDir(run_dir).run_config.read_text())
    records, domains, args = held_out_records(config, where=str(run_dir))
    if not records:
        raise ValueError(f"{run_dir}: no held-out records (--eval-per-domain 0?)")
    model, tok, meta = PradaModel.from_final(RunDir(run_dir).final, attn="sdpa")
    if list(meta["domains"]) != domains:
        raise ValueError(f"{run_dir}: domains {domains} differ from the model's {meta['domains']}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    examples, _ = encode_all(records, tok, args.max_len, {d: i for i, d in enumerate(domains)})
    collate = Collator(tok.pad_token_id)
    feats, labels = [], []
    # on the CPU one thread: robust on cores shared with other jobs (see probes.one_thread)
    with torch_threads(1) if dev.type == "cpu" else contextlib.nullcontext():
        for s in range(0, len(examples), batch_size):
            b = collate(examples[s:s + batch_size])
            ids, att, lab = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
            if all_layers:
                f = model.layer_pooled_features(ids, att, lab)
            else:
                f = model.pooled_features(ids, att, lab)
            feats.append(f.float().cpu())
            labels.append(b["domain_labels"])
    return torch.cat(feats, -2), torch.cat(labels), domains, meta.get("roles", {})


def head_input(d: str | Path, layers: torch.Tensor) -> torch.Tensor:
    """The domain head's input among a finished run's pooled features of every layer
    (pooled_features(all_layers=True), L + 1 rows): the final normed states, or with
    --pool-layer P < L the output of decoder layer P (row P, the hook's tensor). P = L, the
    last layer before the final norm, is no row: pooled again."""
    pool = json.loads((RunDir(d).final / META_FILE).read_text()).get("pool_layer")
    if pool is None:
        return layers[-1]
    return layers[pool] if pool < len(layers) - 1 else pooled_features(d)[0]

