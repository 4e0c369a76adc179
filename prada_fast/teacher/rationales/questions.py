"""The questions of `python -m prada_fast.rationales` and their sampling: the labelled
questions of --data once each, batches of one domain (the same under any number of
ranks), a batch's samples (a second, greedy step for a sample that states no answer),
each judged against the gold answer."""
from __future__ import annotations

import dataclasses
import time

from prada_fast.data import Record, load_spec
from prada_fast.data.format import ANSWER_MARKER, grade

from .generators import Prompter, RationaleError, split_sample


@dataclasses.dataclass
class Question:
    index: int      # position in the (de-duplicated) question list
    record: Record


def load_questions(specs: list[str], skip_bad: bool, seed: int) -> list[Question]:
    """Every labelled question of the specs once (a repeated domain + question is dropped)."""
    records, seen = [], set()
    for spec in specs:
        recs, _ = load_spec(spec, skip_bad=skip_bad, seed=seed)
        for r in recs:
            if r.answer is None or (r.domain, r.question) in seen:
                continue
            seen.add((r.domain, r.question))
            records.append(r)
    if not records:
        raise RationaleError("--data: no question with a gold answer")
    return [Question(i, r) for i, r in enumerate(records)]


def make_batches(questions: list[Question], per_batch: int) -> list[list[Question]]:
    """Batches of one domain each (in the order of first appearance), `per_batch` questions:
    the same whatever the number of ranks, so that each batch's seed fixes its samples."""
    by_domain: dict[str, list[Question]] = {}
    for q in questions:
        by_domain.setdefault(q.record.domain, []).append(q)
    return [qs[i:i + per_batch] for qs in by_domain.values() for i in range(0, len(qs), per_batch)]


def judge(question: Record, samples: list[tuple[str, str, int]]) -> list[dict]:
    """Per sample (rationale, text graded, sample number): the extracted answer and whether
    it is kept (a match, not empty, not a repeat of an earlier kept rationale)."""
    seen, out = set(), []
    for rationale, text, k in samples:
        pred, ok = grade(text, question.answer)
        key = " ".join(rationale.split())
        status = "kept"
        if not ok:
            status = "no answer" if pred is None else "wrong"
        elif not key:
            status = "empty"
        elif key in seen:
            status = "duplicate"
        if status == "kept":
            seen.add(key)
        out.append({"sample": k, "rationale": rationale, "predicted": pred, "status": status})
    return out


def run_batch(gen, prompter: Prompter, batch: list[Question], args, seed: int) -> list[dict]:
    """Samples of every question of a batch, judged: one result line per question."""
    t0 = time.time()
    firsts = gen([prompter.first(q.record.question) for q in batch], args.samples,
                 temperature=args.sample_temperature, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, seed=seed)
    tokens = [sum(n for _, n in outs) for outs in firsts]
    pending = []  # samples that stated no answer: stage 2 asks for one
    staged: list[list] = []
    for qi, (q, outs) in enumerate(zip(batch, firsts)):
        rows = []
        for k, (text, _) in enumerate(outs):
            rationale, answered = split_sample(text)
            rows.append([rationale, text, k])
            if not answered and rationale:
                pending.append((qi, k, prompter.second(q.record.question, rationale)))
        staged.append(rows)
    if pending:
        answers = gen([p for _, _, p in pending], 1, temperature=0.0, top_p=1.0,
                      max_new_tokens=args.answer_tokens, seed=seed)
        for (qi, k, _), [(text, n)] in zip(pending, answers):
            staged[qi][k][1] = f"{staged[qi][k][0]} {ANSWER_MARKER.strip()}{text}"
            tokens[qi] += n
    seconds = (time.time() - t0) / len(batch)
    return [{"index": q.index, "domain": q.record.domain, "tokens": tokens[i],
             "seconds": round(seconds, 4), "samples": judge(q.record, [tuple(r) for r in staged[i]])}
            for i, q in enumerate(batch)]
