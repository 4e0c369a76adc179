"""Evaluation: per-domain answer accuracy with greedy decoding (the final answer parsed
from "The answer is ..."), and the domain classifier's accuracy on pooled features."""
from __future__ import annotations

import torch

from .data.format import answer_correct, extract_answer, prompt_text


def _left_pad(seqs: list[list[int]], pad_id: int):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def answer_accuracy(model, tokenizer, records, *, max_new_tokens: int = 96,
                    batch_size: int = 32) -> dict[str, float]:
    """Fraction of records per domain whose greedy completion states the gold answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = {}
    for s in range(0, len(records), batch_size):
        batch = records[s:s + batch_size]
        prompts = [tokenizer(prompt_text(r), add_special_tokens=False).input_ids for r in batch]
        ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
        out = model.generate(ids.to(device), mask.to(device), max_new_tokens,
                             tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        for r, text in zip(batch, texts):
            hits.setdefault(r.domain, []).append(answer_correct(extract_answer(text), r.answer))
    model.train(was_training)
    return {d: sum(h) / len(h) for d, h in sorted(hits.items())}


@torch.no_grad()
def domain_accuracy(model, batches) -> float:
    """Accuracy of the domain head on pooled features over collated batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for b in batches:
        f = model.pooled_features(b["input_ids"].to(device), b["attention_mask"].to(device),
                                  b["labels"].to(device))
        c = model.domain_head(f)
        right += int((c.argmax(-1).cpu() == b["domain_labels"]).sum())
        total += len(b["domain_labels"])
    model.train(was_training)
    return right / max(total, 1)
