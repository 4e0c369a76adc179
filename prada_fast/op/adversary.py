"""The adversaries of the domain term and their scale lambda (`adv_lambda`): gradient
reversal (DANN), domain confusion (towards the uniform guess), and lambda's schedules
over training (the one lambda scales whichever adversary a run uses)."""
from __future__ import annotations

import math

import torch


class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by -lambda."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """The gradient reversal layer: y = x, dL/dx = -lam * dL/dy."""
    return _GradReverse.apply(x, lam)


def confusion_term(f: torch.Tensor, head, lam: float) -> torch.Tensor:
    """The domain-confusion adversary as a loss term: zero in value, with gradient
    +lam * dL_conf/df, where L_conf = mean_b CE(head(f_b), uniform) = mean_b (logsumexp(c_b) -
    mean_k c_bk). The gradient goes through `head` (any callable: linear, MLP) without
    reaching its parameters: the head learns from L_dom alone."""
    f0 = f.detach().requires_grad_()
    with torch.enable_grad():
        c = head(f0)
        c = c.to(torch.promote_types(c.dtype, torch.float32))
        conf = (torch.logsumexp(c, -1) - c.mean(-1)).mean()
        (g,) = torch.autograd.grad(conf, f0)
    t = (f * g.to(f.dtype)).sum()
    return lam * (t - t.detach())


def dann_lambda(step: int, total_steps: int, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """DANN schedule: lambda(p) = lambda_max * (2 / (1 + exp(-gamma p)) - 1), p = step / total."""
    p = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def lambda_at(schedule: str, step: int, total_steps: int, lambda_max: float = 1.0,
              gamma: float = 10.0) -> float:
    """lambda at `step` for the schedule named "dann" (sigmoid ramp) or "constant"."""
    if schedule == "dann":
        return dann_lambda(step, total_steps, lambda_max, gamma)
    if schedule == "constant":
        return float(lambda_max)
    raise ValueError(f"unknown adversary schedule {schedule!r}: expected 'dann' or 'constant'")
