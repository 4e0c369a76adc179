"""Deterministic, resumable batches: the examples of optimizer step s are a function of
(seed, s) alone, so a resumed run sees exactly the batches an uninterrupted one would.
Each epoch is a fresh permutation; a global batch is cut into gradient-accumulation
micro-steps, and each micro-step into one micro-batch per rank."""
from __future__ import annotations

import torch


class StepBatches:
    def __init__(self, examples: list[dict], collate, *, global_batch: int, micro_batch: int,
                 world_size: int, rank: int, seed: int):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"train_batch_size {global_batch} is not a multiple of "
                             f"micro_batch {micro_batch} x world size {world_size}")
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.collate = examples, collate
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.accum = global_batch // (micro_batch * world_size)
        self._perm: dict[int, torch.Tensor] = {}

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            self._perm = {e: torch.randperm(len(self.examples), generator=g)}
        return self._perm[e]

    def global_indices(self, step: int) -> list[int]:
        n = len(self.examples)
        start = step * self.global_batch
        return [int(self._epoch((start + i) // n)[(start + i) % n]) for i in range(self.global_batch)]

    def step(self, step: int) -> tuple[list[dict], int]:
        """This rank's micro-batches for optimizer step `step`, and the number of labelled
        tokens in the whole global batch (the loss normaliser under accumulation)."""
        idx = self.global_indices(step)
        n_valid = sum(self.examples[i]["n_labels"] for i in idx)
        per_micro = self.micro_batch * self.world_size
        micro = []
        for a in range(self.accum):
            chunk = idx[a * per_micro:(a + 1) * per_micro]
            mine = chunk[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]
            micro.append(self.collate([self.examples[i] for i in mine]))
        return micro, n_valid
