"""Evaluation: per-domain answer accuracy with greedy decoding (the final answer parsed
from "The answer is ..."), and how much domain information the pooled features carry: the
trained domain head's accuracy and a fresh probe's."""
from __future__ import annotations

import math

import torch

from prada_fast.data.format import ANSWER_MARKER, grade, prompt_text
from prada_fast.models.generation import greedy_texts
from prada_fast.trainer.probes import probe_accuracy


@torch.no_grad()
def answer_rows(model, tokenizer, records, *, max_new_tokens: int = 96,
                batch_size: int = 32) -> list[dict]:
    """`answer_batch`'s row of every record, in order, in batches of `batch_size` (the
    model in eval mode meanwhile); `accuracy_by_domain` turns them into accuracies."""
    was_training = model.training
    model.eval()
    rows = [row for s in range(0, len(records), batch_size)
            for row in answer_batch(model, tokenizer, records[s:s + batch_size],
                                    max_new_tokens=max_new_tokens)]
    model.train(was_training)
    return rows


def answer_batch(model, tokenizer, records, *, max_new_tokens: int, prompter=None,
                 answer_tokens: int = 0) -> list[dict]:
    """Per record of one batch, greedily decoded (models.generation.greedy_texts): the
    generated text, the answer read from it and whether it is the gold one
    (data.format.grade), and the domain. prompter: the prompts of an instruct model (a
    teacher.rationales Prompter: `first(question)`, `second(question, rationale)`); None:
    the trainer's own "Q: ...\nA:". answer_tokens > 0: a text that states no answer gets a
    second greedy step of that many tokens asking for it (Kojima et al.'s extraction)."""
    from prada_fast.teacher.rationales.generators import split_sample
    firsts = [prompter.first(r.question) if prompter else prompt_text(r) for r in records]
    texts = greedy_texts(model, tokenizer, firsts, max_new_tokens)
    if answer_tokens and prompter is not None:
        pending = [(i, split_sample(t)[0]) for i, t in enumerate(texts)
                   if not split_sample(t)[1] and split_sample(t)[0]]
        if pending:
            seconds = [prompter.second(records[i].question, rationale) for i, rationale in pending]
            answers = greedy_texts(model, tokenizer, seconds, answer_tokens)
            for (i, rationale), answer in zip(pending, answers):
                texts[i] = f"{rationale} {ANSWER_MARKER.strip()}{answer}"
    rows = []
    for r, text in zip(records, texts):
        predicted, correct = grade(text, r.answer)
        rows.append({"question": r.question, "gold": r.answer, "generated": text,
                     "predicted": predicted, "correct": correct, "domain": r.domain})
    return rows


def accuracy_by_domain(rows: list[dict]) -> dict[str, dict]:
    """Per domain (sorted) of `answer_batch`'s rows: records, correct ones, accuracy."""
    hits: dict[str, list[bool]] = {}
    for row in rows:
        hits.setdefault(row["domain"], []).append(row["correct"])
    return {d: {"records": len(h), "correct": sum(h), "accuracy": sum(h) / len(h)}
            for d, h in sorted(hits.items())}


@torch.no_grad()
def domain_features(model, batches):
    """(pooled features (n, H) float32, domain labels (n,), the head's predictions (n,)) over
    collated batches, through the model's own forward (features_only: under ZeRO-3 every
    rank runs it together, and the soft prompt and the head are gathered for it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels, preds = [], [], []
    for b in batches:
        f, c = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                     b["labels"].to(device), None, features_only=True)
        feats.append(f.float().cpu())
        preds.append(c.argmax(-1).cpu())
        labels.append(b["domain_labels"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(preds)


@torch.no_grad()
def layer_features(model, batches) -> torch.Tensor:
    """(L + 1, n, H) float32: every layer's pooled question features over collated batches
    (PradaModel.layer_pooled_features; layer 0 the input embeddings, the last the final
    states). A plain (unpartitioned) model: the trainer calls it on rank 0 before training
    and on the reloaded final/ after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = [model.layer_pooled_features(b["input_ids"].to(device), b["attention_mask"].to(device),
                                         b["labels"].to(device)).float().cpu() for b in batches]
    model.train(was_training)
    return torch.cat(feats, 1)


def alignment_probe(module, batches, *, fit: bool = True, folds: int = 5) -> dict | None:
    """The curve point of --probe-every, during training: the head's accuracy on the held-out
    batches' pooled question features ("probe_head_acc") and a freshly fitted logistic
    probe's, cross-validated ("probe_acc"). Every rank runs the forward passes (ZeRO-3);
    fit=False (ranks other than 0): nothing more, returns None."""
    f, y, pred = domain_features(module, batches)
    if not fit:
        return None
    probe = probe_accuracy(f, y, folds=folds)
    return {"probe_head_acc": round(float((pred == y).float().mean()) if len(y) else 0.0, 6),
            "probe_acc": None if probe is None else round(probe, 6)}


def domain_alignment(model, batches, *, folds: int = 5, layers: bool = False) -> dict:
    """On held-out records: the domain head's accuracy, a fresh logistic probe's
    (cross-validated, `folds` folds; None with too few records per domain), chance, and the
    number of records. Aligned features put both near chance; a head below chance with a
    probe near 1 means the student fools its head instead of hiding the domain.
    layers: also "layer_probe_accuracy", the same probe on every layer's pooled question
    features (layer_features: the embeddings first, the final states last), where the domain
    is readable and how far training moves it out of reach, layer by layer (L + 1 probes
    more: the trainer's --layer-probes)."""
    f, y, pred = domain_features(model, batches)
    n_domains = model.domain_head.out.out_features
    out = {"head_accuracy": float((pred == y).float().mean()) if len(y) else None,
           "probe_accuracy": probe_accuracy(f, y, folds=folds), "chance": 1 / n_domains,
           "ln_domains": math.log(n_domains), "records": len(y)}
    if layers:
        every = layer_features(model, batches) if len(y) else []
        out["layer_probe_accuracy"] = [probe_accuracy(x, y, folds=folds) for x in every]
    return out


FOOLED_P = 0.01  # how unlikely a head at chance must find the accuracy seen before we say "fooled"


def below_chance_p(correct: int, n: int, chance: float) -> float:
    """P(X <= correct) for X ~ Binomial(n, chance): how likely a head that guesses at chance
    is to score this low or lower on n records."""
    return sum(math.comb(n, k) * chance ** k * (1 - chance) ** (n - k) for k in range(correct + 1))


def fooled(alignment: dict, final_dom_loss: float | None) -> bool:
    """The head is confidently wrong, beyond noise: its accuracy on the held-out records is
    below chance with probability under FOOLED_P for a head at chance (one-sided binomial
    test), while its loss exceeds ln D (a uniform guess would do better on both)."""
    head, n = alignment.get("head_accuracy"), alignment.get("records")
    if head is None or final_dom_loss is None or not n:
        return False
    chance = alignment["chance"]
    return (head < chance and final_dom_loss > alignment["ln_domains"]
            and below_chance_p(round(head * n), n, chance) < FOOLED_P)


# What to try when the head is fooled, by the adversary the run used.
FOOLED_ADVICE = {
    "grl": "Try --adversary confusion (bounded: it pushes the head towards uniform, not towards "
           "wrong), a lower --lambda-max or a higher --domain-head-lr-mult",
    "confusion": "The head lags the student: try a higher --domain-head-lr-mult or a lower "
                 "--lambda-max",
    "mmd": "The head only watches under --adversary mmd; a fresh probe, not the head, says "
           "whether the domains are aligned",
}
