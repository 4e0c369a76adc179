"""Fresh domain probes on pooled features: how much domain information the student's
features still carry, whatever its own domain head says (Elazar and Goldberg 2018: an
adversarial head can be fooled while the attribute stays recoverable). Cross-validated
logistic regression or nearest class mean, in float64 on one thread."""
from __future__ import annotations

import functools

import torch

from prada_fast.common.distributed import torch_threads


def one_thread(fn):
    """Run `fn` on one intra-op thread: its matrices are tiny, and on a busy machine the
    OpenMP hand-offs of several threads make them 100x slower (seconds instead of ms)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)
    return wrapper


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


@one_thread
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
