"""Greedy decoding with the PRADA model (its soft prompt in front of the input) or any
causal LM, and the left-padded batches of token ids that decoding starts from (the
evaluation's and the rationale generators')."""
from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), (len(seqs), longest) int64: each sequence right-aligned (every
    prompt ends at the last column, where generation continues), pad_id and mask 0 before it."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model, input_ids, attention_mask, max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int) -> torch.Tensor:
    """Greedy decoding by `model` (a PradaModel) from left-padded prompts, soft prompt
    included: the student's `generate` on the embeddings [pad | prompt | text]."""
    emb, mask = model.embed(input_ids, attention_mask)
    if model.soft_prompt is not None:  # keep padding on the far left: [pad | prompt | text]
        order = torch.argsort(mask, dim=1, stable=True)
        emb = torch.gather(emb, 1, order.unsqueeze(-1).expand_as(emb))
        mask = torch.gather(mask, 1, order)
    return model.student.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id)


@torch.no_grad()
def greedy_texts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuations of `prompts` (texts, tokenized without special tokens added:
    a chat template brings its own) in one left-padded batch, with the KV cache, by a
    PradaModel (soft prompt in front) or a plain causal LM; the generated text alone."""
    seqs = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(seqs, pad)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if hasattr(model, "soft_prompt"):  # a PradaModel: generates from embeddings, new tokens only
        out = model.generate(ids, mask, max_new_tokens, tokenizer.eos_token_id, pad)
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None,
                             top_p=None, top_k=None, max_new_tokens=max_new_tokens, use_cache=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)[:, ids.shape[1]:]
    return tokenizer.batch_decode(out, skip_special_tokens=True)
