"""--domain-steps K: the domain head trained apart from the student, K updates of its own
classification loss per optimizer step of the student (DomainBed's d_steps_per_g_step).

With K = 0 (the default) the head is one more parameter group of DeepSpeed's optimizer and
learns jointly with the student. With K >= 1 it leaves DeepSpeed altogether
(`PradaModel.release_domain_head`, before the engine is built). Why out of the engine rather
than gathered from ZeRO-3's partitions for each update: the head is tiny (D x H, or an MLP
of a few H x H), so every rank holding it whole costs nothing; out of the engine it is never
partitioned (no gather per update), never cast to bf16 (it keeps fp32 weights and needs no
master copy), never in DeepSpeed's optimizer (nothing to exclude) and never in DeepSpeed's
checkpoint (saved here instead). This works the same under ZeRO stage 0 and 3. The student's
forward still reads it (the fused op takes its weight, the MLP head runs in PyTorch), with
requires_grad off: the adversary's gradient reaches the features through it, and its own
parameters get none from the student's loss.

After the student's step, `HeadSteps.step` takes the pooled features of that step's
micro-batches, detached (what the adversary saw), and makes K AdamW updates of
mean over micro-batches of CE(head(f_m), d_m) -- the weighting DeepSpeed gives the joint
path -- at the student's lr of that step times --domain-head-lr-mult (so it follows the
schedule), with the betas, eps and weight decay of the DeepSpeed config's optimizer. Each
update's gradient is averaged over ranks by one all-reduce, so every rank makes the same
update and the heads stay identical (rank 0's head is broadcast once at the start). Its
weights and optimizer state go in every checkpoint (`state_dict`, one file per rank,
checkpoint.py), so that --resume continues exactly."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from prada_fast.common import distributed as dist_util


def adam_settings(ds_cfg: dict) -> dict:
    """betas, eps and weight decay of the DeepSpeed config's optimizer (torch's defaults
    where it sets none)."""
    params = (ds_cfg.get("optimizer") or {}).get("params", {})
    return {"betas": tuple(params.get("betas", (0.9, 0.999))), "eps": float(params.get("eps", 1e-8)),
            "weight_decay": float(params.get("weight_decay", 0.01))}


class HeadSteps:
    """The domain head's own optimizer and its K updates per student step."""

    def __init__(self, head: nn.Module, k: int, *, lr_mult: float, device, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if k < 1:
            raise ValueError(f"HeadSteps: k must be >= 1, got {k}")
        self.head, self.k, self.lr_mult = head.to(device), k, lr_mult
        self.params = list(head.parameters())
        self.head.requires_grad_(False)  # the student's loss never trains it
        if dist_util.world_size() > 1:  # the same start on every rank
            for p in self.params:
                dist.broadcast(p.data, 0)
        # lr is set before every update (`step`); 0 here is a placeholder
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.skipped = 0  # steps whose head gradient was not finite (no update)

    @classmethod
    def release(cls, model, k: int, ds_cfg: dict, lr_mult: float, device) -> HeadSteps | None:
        """The head of `model` (a PradaModel) taken out of it for K >= 1 (before
        deepspeed.initialize); None for K = 0 (the head stays in DeepSpeed's optimizer)."""
        if k < 1:
            return None
        return cls(model.release_domain_head(), k, lr_mult=lr_mult, device=device,
                   **adam_settings(ds_cfg))

    def loss(self, pooled: list) -> torch.Tensor:
        """Mean over the micro-batches of each one's mean domain CE on its detached features."""
        dtype = self.params[0].dtype
        terms = [nn.functional.cross_entropy(self.head(f.to(dtype)), d) for f, d in pooled]
        return torch.stack(terms).mean()

    def _grads(self, pooled: list) -> list[torch.Tensor]:
        """The gradient of `loss(pooled)` over the head's parameters, averaged over ranks
        (one all-reduce of the flattened gradients)."""
        with torch.enable_grad():
            self.head.requires_grad_(True)
            try:
                grads = torch.autograd.grad(self.loss(pooled), self.params)
            finally:
                self.head.requires_grad_(False)
        if dist_util.world_size() == 1:
            return list(grads)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist_util.world_size()
        return [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]

    def step(self, pooled: list, lr: float) -> None:
        """K updates on `pooled` ([(features, domain labels)] of this rank's micro-batches)
        at lr x lr_mult, each with the gradient averaged over ranks. A gradient that is not
        finite (on any rank: the all-reduce spreads it) makes no update, on every rank."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_mult
        for _ in range(self.k):
            grads = self._grads(pooled)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                self.skipped += 1
                return
            for p, g in zip(self.params, grads):
                p.grad = g
            self.optimizer.step()
            for p in self.params:
                p.grad = None

    def state_dict(self) -> dict:
        return {"k": self.k, "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped = int(state.get("skipped", 0))
