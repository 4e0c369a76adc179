"""Packed rows: the examples of a micro-batch laid end to end in rows, with no padding
between them, so that the student and the teacher spend no compute on padding.

Layout of a row: for each sequence, its K soft-prompt slots then its L tokens, and at the
end of the row the padding up to the longest row of the batch. Each sequence's position
ids restart at 0 (prompt slots 0..K-1, tokens K..K+L-1); the padding at the end counts
from 0 too, as a sequence of its own that nobody reads. `seq_index` gives each slot its
sequence (row-major order; -1: padding), and the domain labels are one per sequence.

Attention never crosses a sequence boundary: prada_fast.models.packed_attention.

The teacher sees the same rows; its position ids (`teacher_position_ids`) restart at 0 at
each sequence's first token, so its prompt slots (pad tokens, which it never reads) form
sequences of their own, and its tokens see exactly what they see unpacked."""
from __future__ import annotations

import torch

from prada_fast.data.format import IGNORE_INDEX, question_index


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `capacity`:
    longest first, each into the first row with room (ties in the order given, so the
    result is a function of the input alone). Rows in order of creation."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sequence of {n} positions does not fit a row of {capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def balanced_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """`first_fit_decreasing` into as few rows as `capacity` allows, then again at the
    smallest capacity (binary search) that keeps that number of rows: the rows come out
    about equally long, so that the batch's width (its longest row) wastes little."""
    rows = first_fit_decreasing(lengths, capacity)
    lo, hi = max(max(lengths), -(-sum(lengths) // len(rows))), capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if len(first_fit_decreasing(lengths, mid)) <= len(rows):
            hi = mid
        else:
            lo = mid + 1
    return first_fit_decreasing(lengths, hi) if hi < capacity else rows


class PackedCollator:
    """Packs encoded examples into rows of at most `width` positions (soft prompts
    included; the trainer uses --max-len + K, the width of a full-length padded row), as
    few rows as fit them, about equally long (`balanced_rows`).

    Returns the batch dict of the padded collator (input_ids, attention_mask: 1 on real
    tokens only, labels, domain_labels (S,)) in the packed layout, plus position_ids,
    teacher_position_ids and seq_index, all (rows, longest row); and question_index (S,)
    when sequences share a question (data.format.question_index)."""

    def __init__(self, pad_id: int, n_prompt: int, width: int):
        if width < n_prompt + 1:
            raise ValueError(f"rows of {width} positions cannot hold a {n_prompt}-vector prompt and a token")
        self.pad_id, self.n_prompt, self.width = pad_id, n_prompt, width

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        K = self.n_prompt
        sizes = [K + len(ex["input_ids"]) for ex in examples]
        rows = balanced_rows(sizes, self.width)
        shape = (len(rows), max(sum(sizes[i] for i in row) for row in rows))
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        seq_index = torch.full(shape, -1, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        teacher_position_ids = torch.zeros(shape, dtype=torch.long)
        domains, qids, s = [], [], 0
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                ex, L = examples[i], sizes[i] - K
                text = slice(at + K, at + K + L)
                input_ids[r, text] = torch.tensor(ex["input_ids"], dtype=torch.long)
                labels[r, text] = torch.tensor(ex["labels"], dtype=torch.long)
                attention_mask[r, text] = 1
                seq_index[r, at:at + K + L] = s
                position_ids[r, at:at + K + L] = torch.arange(K + L)
                teacher_position_ids[r, at:at + K] = torch.arange(K)
                teacher_position_ids[r, text] = torch.arange(L)
                domains.append(ex["domain"])
                qids.append(ex.get("qid"))
                at, s = at + K + L, s + 1
            position_ids[r, at:] = teacher_position_ids[r, at:] = torch.arange(shape[1] - at)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "domain_labels": torch.tensor(domains, dtype=torch.long),
                 "position_ids": position_ids, "teacher_position_ids": teacher_position_ids,
                 "seq_index": seq_index}
        index = question_index(qids)  # sequences that share a question: counted once
        if index is not None:
            batch["question_index"] = index
        return batch


def position_counts(mb: dict, n_prompt: int) -> tuple[int, int, int]:
    """(real tokens, padding, all positions) of the student's input for batch `mb`, padded
    (B x (K + T)) or packed (rows x width); the soft-prompt slots are the rest."""
    real = int(mb["attention_mask"].sum())
    n_seq = len(mb["domain_labels"])
    B, T = mb["input_ids"].shape
    positions = B * T if "seq_index" in mb else B * (n_prompt + T)
    return real, positions - real - n_seq * n_prompt, positions
