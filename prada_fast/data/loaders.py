"""Read one data source into :class:`Record` objects.

Every loader returns ``(records, n_skipped)``. A bad record raises :class:`DataError`
naming the file, the line (or array element) and the field; with ``skip_bad=True`` it
is skipped and counted instead. Nothing is dropped silently (blank lines are not records).

The ``--data`` grammar that picks a reader (``load_spec``, ``check_spec``) is in
:mod:`prada_fast.data.spec`.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .format import canonical_number
from .records import DataError, Record

# the columns of `python -m prada_fast.rationales` output (a JSON-lines file with them is
# recognised whatever its name)
RATIONALE_COLUMNS = ("question", "rationale", "answer", "domain", "teacher")

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COLUMN_KEYS = ("question", "rationale", "answer")

Converter = Callable[[Any, str], Record]


# ---------------------------------------------------------------- field helpers


def _as_object(row: Any, origin: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", origin=origin)
    return row


def _field(row: Any, key: str, origin: str, kind: type | tuple[type, ...], required: bool = True):
    """``row[key]`` checked against ``kind``; ``None`` when absent and not required."""
    row = _as_object(row, origin)
    value = row.get(key)
    if value is None:
        if required:
            raise DataError("missing", origin=origin, field=key)
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"expected {names}, got {type(value).__name__}", origin=origin, field=key)
    return value


def _question(row: Any, key: str, origin: str) -> str:
    text = _field(row, key, origin, str).strip()
    if not text:
        raise DataError("empty question", origin=origin, field=key)
    return text


def _optional_text(value: str | None) -> str | None:
    if value is None:
        return None
    return value.strip() or None


def _answer_text(value: Any, key: str, origin: str) -> str:
    """A JSON answer (string, number or boolean) as text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise DataError("empty answer", origin=origin, field=key)
    return text


def strip_number_commas(text: str) -> str:
    """``"1,200,000"`` -> ``"1200000"``; commas that do not group digits stay."""
    return _NUMBER_COMMA.sub("", text)


# ---------------------------------------------------------------- reading files


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}", origin=str(path))
    return path


def _not_utf8(err: UnicodeDecodeError, column: int) -> str:
    """What a UnicodeDecodeError found, e.g. ``not UTF-8: byte 0xff at column 7``."""
    byte = err.object[err.start:err.start + 1].hex()
    return f"not UTF-8: byte 0x{byte} at column {column} (save the file as UTF-8)"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read it: {err.strerror or err}", origin=str(path)) from None


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """``(origin, parsed object)`` per non-blank line; a bad line (not JSON, not UTF-8)
    yields a DataError naming the file and line."""
    try:
        fh = path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read it: {err.strerror or err}", origin=str(path)) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            origin = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield origin, DataError(_not_utf8(err, err.start + 1), origin=origin)
                continue
            if not line.strip():
                continue
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as err:
                yield origin, DataError(
                    f"invalid JSON: {err.msg} (column {err.colno})", origin=origin
                )


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """``(origin, element)`` for a file holding one JSON array."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        raise DataError(_not_utf8(err, column + 1), origin=f"{path.name}:{lineno}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        origin = f"{path.name}:{err.lineno}"
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", origin=origin) from None
    if not isinstance(data, list):
        raise DataError(f"expected one JSON array, got {type(data).__name__}", origin=path.name)
    for index, element in enumerate(data):
        yield f"{path.name}[{index}]", element


def _first_char(path: Path) -> str:
    """The first non-blank character of a file ("" for an empty or unreadable one)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError:
        return ""
    return head[:1].decode("ascii", "replace")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array file (SVAMP.json) element by element, else JSON lines."""
    return _json_array(path) if _first_char(path) == "[" else _json_lines(path)


def _collect(
    rows: Iterable[tuple[str, Any]], convert: Converter, skip_bad: bool
) -> tuple[list[Record], int]:
    """Convert every row; raise on the first bad one, or skip and count when skip_bad."""
    records: list[Record] = []
    skipped = 0
    for origin, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            records.append(convert(row, origin))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return records, skipped


# ---------------------------------------------------------------- known formats


def _gsm8k_record(row: Any, origin: str, domain: str) -> Record:
    question = _question(row, "question", origin)
    text = _field(row, "answer", origin, str)
    body, marker, final = text.rpartition("####")
    if not marker:
        raise DataError('missing "#### " final-answer line', origin=origin, field="answer")
    answer = strip_number_commas(final.strip())
    if not answer:
        raise DataError('nothing after "####"', origin=origin, field="answer")
    rationale = _optional_text(_CALCULATOR.sub("", body))
    return Record(question, rationale, answer, domain, origin=origin)


def _aqua_record(row: Any, origin: str, domain: str) -> Record:
    question = _question(row, "question", origin)
    options = _field(row, "options", origin, list)
    if not options or not all(isinstance(o, str) and o.strip() for o in options):
        raise DataError("expected a non-empty list of strings", origin=origin, field="options")
    options = [o.strip() for o in options]
    correct = _field(row, "correct", origin, str).strip().upper()
    letters = [o[0].upper() for o in options]
    if len(correct) != 1 or correct not in letters:
        raise DataError(
            f"{correct!r} is not one of the option letters {', '.join(letters)}",
            origin=origin,
            field="correct",
        )
    rationale = _optional_text(_field(row, "rationale", origin, str))
    question = f"{question} Options: {' '.join(options)}"
    return Record(question, rationale, correct, domain, origin=origin)


def _strategyqa_record(row: Any, origin: str, domain: str) -> Record:
    question = _question(row, "question", origin)
    answer = _field(row, "answer", origin, bool)
    facts = _field(row, "facts", origin, list)
    if not all(isinstance(f, str) for f in facts):
        raise DataError("expected a list of strings", origin=origin, field="facts")
    rationale = _optional_text(" ".join(f.strip() for f in facts if f.strip()))
    return Record(question, rationale, "yes" if answer else "no", domain, origin=origin)


def load_gsm8k(
    path: str | Path, domain: str = "gsm8k", skip_bad: bool = False
) -> tuple[list[Record], int]:
    """GSM8K JSON lines: rationale without ``<<...>>`` annotations, answer after ``####``."""
    rows = _json_lines(_existing_file(path))
    return _collect(rows, lambda row, origin: _gsm8k_record(row, origin, domain), skip_bad)


def load_aqua(
    path: str | Path, domain: str = "aqua", skip_bad: bool = False
) -> tuple[list[Record], int]:
    """AQuA-RAT JSON lines: question with its options appended, answer = the letter."""
    rows = _json_lines(_existing_file(path))
    return _collect(rows, lambda row, origin: _aqua_record(row, origin, domain), skip_bad)


def load_strategyqa(
    path: str | Path, domain: str = "strategyqa", skip_bad: bool = False
) -> tuple[list[Record], int]:
    """StrategyQA (one JSON array): rationale = facts joined, answer ``yes``/``no``."""
    rows = _json_array(_existing_file(path))
    return _collect(rows, lambda row, origin: _strategyqa_record(row, origin, domain), skip_bad)


# ---------------------------------------------------------------- generic tables


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _template_columns(template: str) -> list[str]:
    """The columns a ``{Body} {Question}`` template names (none: a plain column name)."""
    return _PLACEHOLDER.findall(template)


def _joined(row: Any, template: str, origin: str, required: bool) -> str | None:
    """A column, or several joined by a template (``{Body} {Question}``): each named column
    must hold text or a number; None when a plain column is absent and not required."""
    names = _template_columns(template)
    if not names:
        value = _field(row, template, origin, (str, int, float, bool), required)
        if value is None or isinstance(value, str):
            return value if value is None else value.strip()
        return _answer_text(value, template, origin)
    parts = {}
    for name in names:
        value = _field(row, name, origin, (str, int, float))
        parts[name] = value.strip() if isinstance(value, str) else _answer_text(value, name, origin)
    return " ".join(_PLACEHOLDER.sub(lambda m: parts[m.group(1)], template).split())


def _table_converter(fields: dict[str, str], domain: str | None) -> Converter:
    """Convert a row of a generic table using a field mapping (see ``load_jsonl``)."""
    unknown = set(fields) - {*_COLUMN_KEYS, "domain"}
    if unknown:
        raise DataError(f"unknown field mapping keys {sorted(unknown)}; known: "
                        f"{', '.join((*_COLUMN_KEYS, 'domain'))}")
    if domain is None and "domain" not in fields:
        raise DataError("no domain: give a fixed domain or a domain field")
    for key, template in fields.items():
        names, rest = _template_columns(template), _PLACEHOLDER.sub("", template)
        if "{" in rest or "}" in rest or any(not n.strip() for n in names):
            raise DataError(f"{key}={template!r}: a template names columns in braces, "
                            "e.g. {Body} {Question}")
    columns = {key: fields.get(key, key) for key in _COLUMN_KEYS}
    # Columns named explicitly must be there; the default ones are optional.
    required = {key: key in fields for key in _COLUMN_KEYS}

    def convert(row: Any, origin: str) -> Record:
        _as_object(row, origin)
        question = _joined(row, columns["question"], origin, True)
        if not question:
            raise DataError("empty question", origin=origin, field=columns["question"])
        rationale = _joined(row, columns["rationale"], origin, required["rationale"])
        answer = _joined(row, columns["answer"], origin, required["answer"])
        if answer is not None:
            if not answer:
                raise DataError("empty answer", origin=origin, field=columns["answer"])
            answer = canonical_number(answer) or answer
        row_domain = domain
        if "domain" in fields:
            row_domain = _field(row, fields["domain"], origin, str).strip()
            if not row_domain:
                raise DataError("empty domain", origin=origin, field=fields["domain"])
        return Record(question, _optional_text(rationale), answer, row_domain, origin=origin)

    return convert


def load_jsonl(
    path: str | Path, fields: dict[str, str], domain: str | None, skip_bad: bool = False
) -> tuple[list[Record], int]:
    """Generic JSON lines (or one JSON array).

    ``fields`` maps ``question``/``rationale``/``answer``/``domain`` to column names, e.g.
    ``{"question": "q", "rationale": "r", "answer": "a"}``; unmapped ones default to a
    column of the same name and are then optional (``None`` when absent), mapped ones are
    required. The domain is ``domain`` (fixed) or, when ``fields`` maps ``domain``, read
    from that column. A column name may be a template joining several columns,
    ``{"question": "{Body} {Question}"}`` (SVAMP). Answers may be strings, numbers or
    booleans (``yes``/``no``); a number in a usual spelling (``"1,234"``, ``"$5"``,
    ``5.0``) becomes its plain one (``1234``, ``5``); fractions (``1/2``) stay.
    """
    convert = _table_converter(fields, domain)
    return _collect(_json_rows(_existing_file(path)), convert, skip_bad)


def load_hf(
    name_or_dir: str | Path,
    fields: dict[str, str],
    domain: str | None,
    split: str = "train",
    skip_bad: bool = False,
    *,
    config: str | None = None,
) -> tuple[list[Record], int]:
    """A table read with ``datasets.load_dataset``, converted as in ``load_jsonl``.

    A local directory, or a local json/jsonl/csv/parquet file, works offline; a hub name
    needs network. Whatever ``datasets`` raises is re-raised as DataError naming the source.
    """
    convert = _table_converter(fields, domain)
    name = str(name_or_dir)
    path = Path(name_or_dir)
    try:
        import datasets

        if path.is_file():
            builder = _HF_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"cannot read {path.suffix!r} files; known: {', '.join(_HF_FILE_BUILDERS)}",
                    origin=name,
                )
            table = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        else:
            table = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many kinds; name the source in all of them
        raise DataError(f"datasets could not load it: {type(err).__name__}: {err}",
                        origin=name) from err
    label = path.name if path.exists() else name
    rows = ((f"{label}:{split}[{i}]", row) for i, row in enumerate(table))
    return _collect(rows, convert, skip_bad)



def _is_rationales_file(path: Path) -> bool:
    """Whether a JSON-lines file's first record has the columns of a rationales file."""
    try:
        with path.open("rb") as fh:
            first = next((line for line in fh if line.strip()), b"")
        row = json.loads(first.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and all(k in row for k in RATIONALE_COLUMNS)


def load_rationales(path: str | Path, skip_bad: bool = False) -> tuple[list[Record], int]:
    """The output of ``python -m prada_fast.rationales``: question, rationale, answer and
    domain per line (sample number and teacher are informational). The rationales of one
    question share a ``question_id``."""
    fields = {key: key for key in (*_COLUMN_KEYS, "domain")}
    records, skipped = load_jsonl(path, fields, None, skip_bad=skip_bad)
    return [replace(r, question_id=f"{r.domain}:{r.question}") for r in records], skipped
