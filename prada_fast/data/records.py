"""The record every loader produces, and the error every loader raises."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    """One chain-of-thought example.

    ``rationale`` and ``answer`` may be ``None`` for unlabelled data; ``labelled`` says
    whether the record's rationale and answer are trained on (source domain) or only its
    question is seen (target domain). ``origin`` ("file:line", "file[index]" or
    "synthetic:<domain>:<i>") points back to where the record came from. Records with
    the same ``question_id`` are several rationales of one question (a teacher's samples):
    they are held out together and count once in the domain loss; ``None``: a record of
    its own.
    """

    question: str
    rationale: str | None
    answer: str | None
    domain: str
    labelled: bool = True
    origin: str = ""
    question_id: str | None = None


class DataError(ValueError):
    """A bad data source or record.

    The message names where the problem is (file and 1-based line, or file and element
    index for a JSON array) and, for a record, the field, e.g.
    ``gsm8k_train.jsonl:17: field "answer": missing "#### " final-answer line``.
    """

    def __init__(self, message: str, *, origin: str | None = None, field: str | None = None):
        self.origin = origin
        self.field = field
        self.problem = message
        parts = [origin] if origin else []
        if field is not None:
            parts.append(f'field "{field}"')
        parts.append(message)
        super().__init__(": ".join(parts))
