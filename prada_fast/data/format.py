"""Turn records into text, token ids and padded batches; read answers back out of text."""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from prada_fast.op.options import IGNORE_INDEX  # the op's: labels that are not trained

from .records import DataError, Record

PROMPT = "Q: {question}\nA:"
ANSWER_MARKER = "The answer is "

_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_BOOLEANS = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def prompt_text(record: Record) -> str:
    """The prompt the model is given: ``Q: {question}\\nA:``."""
    return PROMPT.format(question=record.question)


def completion_text(record: Record) -> str:
    """The target after the prompt: `` {rationale} The answer is {answer}.``."""
    if record.answer is None:
        raise DataError("labelled record has no answer", origin=record.origin, field="answer")
    rationale = f" {record.rationale}" if record.rationale else ""
    return f"{rationale} {ANSWER_MARKER}{record.answer}."


def extract_answer(text: str) -> str | None:
    """The text after the last "The answer is " of the first answer, up to the sentence's
    final "." or newline.

    The first answer ends where a generation starts a new question ("\nQ:"); within it the
    last marker counts, since real rationales (AQuA) may say "The answer is" on the way. A
    "." ends the answer only where whitespace or the end follows it, so ``3.5`` stays
    whole. ``None`` when the marker is absent or nothing follows it.
    """
    text = text.split("\nQ:", 1)[0]
    start = text.rfind(ANSWER_MARKER)
    if start < 0:
        return None
    rest = text[start + len(ANSWER_MARKER):].split("\n", 1)[0]
    end = _SENTENCE_END.search(rest)
    answer = (rest[: end.start()] if end else rest).strip()
    return answer or None


def parse_number(text: str) -> float | None:
    """The value of a number in one of the usual spellings, else None: ``1,234``, ``$5``,
    ``5.0``, ``-3``, ``50%`` (50), ``1e3``, ``1/2`` (0.5), with a final "." allowed."""
    text = text.strip().rstrip(".").strip()
    if text.startswith("-$"):
        text = "-" + text[2:]
    text = re.sub(r"(?<=\d),(?=\d)", "", text).lstrip("$").rstrip("%").strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    fraction = _FRACTION.fullmatch(text)
    if fraction and int(fraction.group(2)) != 0:
        return int(fraction.group(1)) / int(fraction.group(2))
    return None


def canonical_number(text: str) -> str | None:
    """A number's plain spelling (``"$1,234.00"`` -> ``"1234"``, ``"5.50"`` -> ``"5.5"``,
    ``"1/2"`` stays ``"1/2"``), or None when `text` is not a number."""
    value = parse_number(text)
    if value is None:
        return None
    if _FRACTION.fullmatch(text.strip().rstrip(".").strip()):
        return "".join(text.split()).rstrip(".")
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _normalise(text: str) -> str | float:
    """A comparable form: a float for numbers, else lower-case text without decoration."""
    text = text.strip().rstrip(".").strip().lower()
    if len(text) > 2 and text[0] == "(" and text[-1] == ")":
        text = text[1:-1].strip()
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    number = parse_number(text)
    if number is not None:
        return number
    return " ".join(text.split())


def answer_correct(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer matches the gold one (case, commas, 6 vs 6.0, yes/true),
    or states it in an instruct model's words (`_stated`): "D) 74325" for the choice D,
    "yes, they are" for yes, "48 eggs" for 48."""
    if pred is None:
        return False
    a, b = _normalise(pred), _normalise(gold)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b or _stated(pred, b)


_CHOICE = re.compile(r"\(?([a-e])\)(?=\s|$)")            # "d) 74325", "(c) 600"
_WORD = re.compile(r"[a-z]+")
_UNIT_WORDS = re.compile(r"[a-z][a-z'-]*(\s+[a-z][a-z'-]*)*")  # "eggs", "miles per hour"


def _stated(pred: str, gold: str | float) -> bool:
    """Whether `pred` states the normalised `gold` the way an instruct model words an
    answer, where the plain comparison fails: a multiple-choice letter followed by its
    option's text ("D) 74325" for d); a yes/no first, with words after it and no other
    yes/no/true/false ("no, the kingdom had no monarch" for no; "yes or no" is not); a
    number followed by words alone ("48 eggs", "9 hours" for 48, 9; "1560 * 3 = 4200 cups"
    is not). Nothing else: an answer that says more than one thing stays wrong."""
    text = " ".join(pred.strip().lower().split())
    if isinstance(gold, float):
        number, _, rest = text.partition(" ")
        value = parse_number(number)
        return (value is not None and bool(_UNIT_WORDS.fullmatch(rest.rstrip(".")))
                and math.isclose(value, gold, rel_tol=1e-9, abs_tol=1e-9))
    if gold in ("yes", "no"):
        words = [_BOOLEANS[w] for w in _WORD.findall(text) if w in _BOOLEANS]
        first = _WORD.match(text)
        return bool(first) and _BOOLEANS.get(first.group()) == gold and set(words) == {gold}
    if len(gold) == 1 and gold in "abcde":
        choice = _CHOICE.match(text)
        return bool(choice) and choice.group(1) == gold
    return False


def grade(text: str, gold: str | None) -> tuple[str | None, bool]:
    """The answer checker of the evaluation and of the teacher's rationales, one for every
    domain: (the answer extracted from a generated `text`, whether it matches `gold`)."""
    pred = extract_answer(text)
    return pred, gold is not None and answer_correct(pred, gold)


def encode(
    record: Record, tokenizer: Any, max_len: int, domain_id: int, truncate: bool = True
) -> dict:
    """Token ids and (unshifted) labels for one record.

    Labels are -100 on the prompt and equal the ids on the completion and the eos token;
    an unlabelled record is encoded as its prompt alone, every label -100. Longer than
    ``max_len``: cut from the end (``truncated=True``), or DataError when not ``truncate``.
    ``length`` and ``prompt_length`` are the token counts before any cut.
    """
    prompt = tokenizer(prompt_text(record), add_special_tokens=False)["input_ids"]
    completion: list[int] = []
    if record.labelled:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token")
        completion = tokenizer(completion_text(record), add_special_tokens=False)["input_ids"]
        completion = [*completion, tokenizer.eos_token_id]
    input_ids = [*prompt, *completion]
    labels = [IGNORE_INDEX] * len(prompt) + completion
    length = len(input_ids)
    truncated = length > max_len
    if truncated:
        if not truncate:
            raise DataError(
                f"{len(input_ids)} tokens, more than max_len={max_len}", origin=record.origin
            )
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "labels": labels, "domain": domain_id, "truncated": truncated,
            "length": length, "prompt_length": len(prompt)}


class Collator:
    """Right-pads encoded examples into a batch of int64 tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(ex["input_ids"]) for ex in examples)
        shape = (len(examples), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(examples):
            length = len(ex["input_ids"])
            input_ids[row, :length] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.tensor(ex["labels"], dtype=torch.long)
        domain_labels = torch.tensor([ex["domain"] for ex in examples], dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "domain_labels": domain_labels,
        }
        index = question_index([ex.get("qid") for ex in examples])
        if index is not None:
            batch["question_index"] = index
        return batch


def question_index(qids: list) -> torch.Tensor | None:
    """(B,) int64: each row's question numbered 0..S-1 in order of appearance, where some
    rows share a question (several rationales of it); None where every row is its own."""
    if None in qids or len(set(qids)) == len(qids):
        return None
    order: dict = {}
    return torch.tensor([order.setdefault(q, len(order)) for q in qids], dtype=torch.long)
