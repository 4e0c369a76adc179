"""Deterministic, resumable batches: the examples of optimizer step s are a function of
(seed, s) alone, so a resumed run sees exactly the batches an uninterrupted one would.
Each epoch is a fresh permutation, read as one stream; a global batch is cut into
gradient-accumulation micro-steps, and each micro-step into one micro-batch per rank.

A micro-batch holds a fixed number of examples, or with `tokens_per_batch` as many
examples as fit that many tokens (each example: the soft prompt's K positions plus its
own tokens; at least one example). The number of micro-batches per optimizer step stays
accumulation steps x world size, so DeepSpeed's accumulation boundary is unchanged; where
a step starts in the stream then depends on the steps before it, which `_start` computes
from the examples' lengths alone (cheap, and the same on every rank and after a resume)."""
from __future__ import annotations

import torch


class StepBatches:
    def __init__(self, examples: list[dict], collate, *, global_batch: int, micro_batch: int,
                 world_size: int, rank: int, seed: int, tokens_per_batch: int = 0,
                 n_prompt: int = 0):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"train_batch_size {global_batch} is not a multiple of "
                             f"micro_batch {micro_batch} x world size {world_size}")
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.collate = examples, collate
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.accum = global_batch // (micro_batch * world_size)
        self.tokens_per_batch = tokens_per_batch
        self.cost = [n_prompt + len(ex["input_ids"]) for ex in examples]
        self._perm: dict[int, torch.Tensor] = {}
        self._starts = [0]  # stream position of each step's first example (tokens_per_batch)

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 100_003 + e)
            self._perm = {e: torch.randperm(len(self.examples), generator=g)}
        return self._perm[e]

    def _at(self, pos: int) -> int:
        """The example at position `pos` of the stream of epochs."""
        n = len(self.examples)
        return int(self._epoch(pos // n)[pos % n])

    def _cut(self, pos: int) -> list[list[int]]:
        """Micro-batches of one optimizer step by tokens, from stream position `pos`: each
        takes examples while their cost stays within tokens_per_batch (at least one)."""
        micro = []
        for _ in range(self.accum * self.world_size):
            batch, used = [], 0
            while not batch or used + self.cost[self._at(pos)] <= self.tokens_per_batch:
                i = self._at(pos)
                batch.append(i)
                used, pos = used + self.cost[i], pos + 1
            micro.append(batch)
        return micro

    def _start(self, step: int) -> int:
        while len(self._starts) <= step:
            self._starts.append(self._starts[-1] + sum(map(len, self._cut(self._starts[-1]))))
        return self._starts[step]

    def global_micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of every micro-batch of optimizer step `step`, all ranks: micro-step
        a of rank r is entry a * world_size + r."""
        if self.tokens_per_batch:
            return self._cut(self._start(step))
        start = step * self.global_batch
        idx = [self._at(start + i) for i in range(self.global_batch)]
        return [idx[j:j + self.micro_batch] for j in range(0, len(idx), self.micro_batch)]

    def global_indices(self, step: int) -> list[int]:
        return [i for mb in self.global_micro_batches(step) for i in mb]

    def step(self, step: int) -> tuple[list[dict], int]:
        """This rank's micro-batches for optimizer step `step`, and the number of labelled
        tokens in the whole global batch (the loss normaliser under accumulation)."""
        micro = self.global_micro_batches(step)
        n_valid = sum(self.examples[i]["n_labels"] for mb in micro for i in mb)
        mine = micro[self.rank::self.world_size]
        return [self.collate([self.examples[i] for i in mb]) for mb in mine], n_valid
