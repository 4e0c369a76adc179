"""Read one data source into :class:`Record` objects.

Every loader returns ``(records, n_skipped)``. A bad record raises :class:`DataError`
naming the file, the line (or array element) and the field; with ``skip_bad=True`` it
is skipped and counted instead. Nothing is dropped silently (blank lines are not records).

Data spec grammar (``load_spec``, the ``--data`` flag)::

    synthetic                     built-in generator, 400 records per domain, all domains
    synthetic:N                   N records per domain
    synthetic:N:dom1,dom2         N records of the named domains (arithmetic, coinflip,
                                  lastletter, sorting, and the story domains shopping,
                                  travel, recipes, garden, wordshop, market, zoo, harbor)
    PATH                          a file whose name says its format: gsm8k*.jsonl,
                                  aqua*.json(l), strategyqa*.json
    FORMAT:PATH                   FORMAT is gsm8k | aqua | strategyqa | jsonl | hf
    ...?key=value&key=value       options:
                                    every format: domain=NAME (the domain's name)
                                    jsonl, hf: question=COL rationale=COL answer=COL
                                      (default: columns named question, rationale,
                                      answer), domain_field=COL (domain read per row;
                                      default domain: the file's stem or dataset's name)
                                    hf only: split=NAME (default train), config=NAME
    ...#N                         keep the first N records

Examples: ``/data/gsm8k_train.jsonl#300``, ``aqua:/data/aqua_dev.json?domain=algebra``,
``jsonl:/p/x.jsonl?question=q&rationale=r&answer=a&domain=math``,
``hf:/p/parquet_dir?split=test&domain_field=task``, ``hf:openai/gsm8k?config=main``
(a hub name needs network).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import synthetic
from .records import DataError, Record

FORMATS = ("gsm8k", "aqua", "strategyqa", "jsonl", "hf")
DEFAULT_SYNTHETIC_N = 400

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LIMIT = re.compile(r"#(\d+)$")
_FORMAT_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", re.DOTALL)
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


def _table_converter(fields: dict[str, str], domain: str | None) -> Converter:
    """Convert a row of a generic table using a field mapping (see ``load_jsonl``)."""
    unknown = set(fields) - {*_COLUMN_KEYS, "domain"}
    if unknown:
        raise DataError(f"unknown field mapping keys {sorted(unknown)}; known: "
                        f"{', '.join((*_COLUMN_KEYS, 'domain'))}")
    if domain is None and "domain" not in fields:
        raise DataError("no domain: give a fixed domain or a domain field")
    columns = {key: fields.get(key, key) for key in _COLUMN_KEYS}
    # Columns named explicitly must be there; the default ones are optional.
    required = {key: key in fields for key in _COLUMN_KEYS}

    def convert(row: Any, origin: str) -> Record:
        question = _question(row, columns["question"], origin)
        rationale = _field(row, columns["rationale"], origin, str, required["rationale"])
        raw_answer = _field(
            row, columns["answer"], origin, (str, int, float, bool), required["answer"]
        )
        answer = None
        if raw_answer is not None:
            answer = _answer_text(raw_answer, columns["answer"], origin)
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
    """Generic JSON lines.

    ``fields`` maps ``question``/``rationale``/``answer``/``domain`` to column names, e.g.
    ``{"question": "q", "rationale": "r", "answer": "a"}``; unmapped ones default to a
    column of the same name and are then optional (``None`` when absent), mapped ones are
    required. The domain is ``domain`` (fixed) or, when ``fields`` maps ``domain``, read
    from that column. Answers may be strings, numbers or booleans (``yes``/``no``).
    """
    convert = _table_converter(fields, domain)
    return _collect(_json_lines(_existing_file(path)), convert, skip_bad)


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


# ---------------------------------------------------------------- the spec string


def _split_limit(spec: str) -> tuple[str, int | None]:
    match = _LIMIT.search(spec)
    if match is None:
        return spec, None
    limit = int(match.group(1))
    if limit < 1:
        raise DataError("#N must keep at least one record", origin=repr(spec))
    return spec[: match.start()], limit


def _parse_options(text: str, allowed: tuple[str, ...], spec: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in filter(None, text.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise DataError(f"option {item!r} is not key=value", origin=repr(spec))
        if key not in allowed:
            raise DataError(
                f"unknown option {key!r}; this format takes {', '.join(allowed)}",
                origin=repr(spec),
            )
        if key in options:
            raise DataError(f"option {key!r} given twice", origin=repr(spec))
        options[key] = value
    if "domain" in options and "domain_field" in options:
        raise DataError("give domain or domain_field, not both", origin=repr(spec))
    return options


def _format_from_name(path: str, spec: str) -> str:
    name = Path(path).name.lower()
    if name.startswith("gsm8k") and name.endswith(".jsonl"):
        return "gsm8k"
    if name.startswith("aqua") and name.endswith((".json", ".jsonl")):
        return "aqua"
    if name.startswith("strategyqa") and name.endswith(".json"):
        return "strategyqa"
    raise DataError(
        f"cannot tell the format from the file name; write FORMAT:PATH with FORMAT one of "
        f"{', '.join(FORMATS)}",
        origin=repr(spec),
    )


def _split_format(body: str, spec: str) -> tuple[str, str]:
    """``(format, rest)`` for ``FORMAT:REST``, or the format named by a plain path."""
    match = _FORMAT_PREFIX.match(body)
    if match and match.group(1).lower() in FORMATS:
        return match.group(1).lower(), match.group(2)
    if match and not Path(body.partition("?")[0]).exists():
        raise DataError(
            f"unknown format {match.group(1)!r}; known: synthetic, {', '.join(FORMATS)}",
            origin=repr(spec),
        )
    return _format_from_name(body.partition("?")[0], spec), body


def _synthetic_args(rest: str, spec: str) -> tuple[int, tuple[str, ...]]:
    """(records per domain, domains) of ``synthetic[:N[:dom,...]]``."""
    count, _, names = rest.partition(":")
    n = DEFAULT_SYNTHETIC_N
    if count:
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"records per domain must be a positive integer, got {count!r}",
                            origin=repr(spec))
        n = int(count)
    domains = tuple(d.strip() for d in names.split(",") if d.strip()) or synthetic.DOMAINS
    unknown = [d for d in domains if d not in synthetic.ALL_DOMAINS]
    if unknown:
        raise DataError(f"unknown synthetic domain(s) {', '.join(unknown)}; known: "
                        f"{', '.join(synthetic.ALL_DOMAINS)}", origin=repr(spec))
    return n, domains


def _file_args(fmt: str, rest: str, spec: str) -> tuple[str, dict[str, str]]:
    """(path or dataset name, options) of ``FORMAT:PATH?options``; a missing file raises."""
    target, _, option_text = rest.partition("?")
    table_keys = ("domain", "domain_field", *_COLUMN_KEYS)
    allowed = {"jsonl": table_keys, "hf": (*table_keys, "split", "config")}.get(fmt, ("domain",))
    options = _parse_options(option_text, allowed, spec)
    if not target:
        raise DataError("no path after the format", origin=repr(spec))
    if fmt != "hf" and not Path(target).is_file():
        raise DataError(f"no such file: {target}", origin=repr(spec))
    return target, options


def _load_file(fmt: str, rest: str, spec: str, skip_bad: bool) -> tuple[list[Record], int]:
    target, options = _file_args(fmt, rest, spec)
    if fmt in ("gsm8k", "aqua", "strategyqa"):
        loader = {"gsm8k": load_gsm8k, "aqua": load_aqua, "strategyqa": load_strategyqa}[fmt]
        return loader(target, domain=options.get("domain", fmt), skip_bad=skip_bad)
    fields = {key: options[key] for key in _COLUMN_KEYS if key in options}
    domain: str | None = options.get("domain")
    if "domain_field" in options:
        fields["domain"] = options["domain_field"]
    elif domain is None:
        domain = Path(target).stem if Path(target).is_file() else Path(target).name
    if fmt == "jsonl":
        return load_jsonl(target, fields, domain, skip_bad=skip_bad)
    return load_hf(target, fields, domain, split=options.get("split", "train"),
                   skip_bad=skip_bad, config=options.get("config"))


def check_spec(spec: str) -> None:
    """Check a spec string without reading any data: its grammar, its options, and that a
    file it names exists. Raises DataError naming the spec (the trainer's flag check)."""
    spec = spec.strip()
    if not spec:
        raise DataError("empty data spec")
    body, _ = _split_limit(spec)
    if body == "synthetic" or body.startswith("synthetic:"):
        _synthetic_args(body[len("synthetic:"):], spec)
    else:
        _file_args(*_split_format(body, spec), spec)


def load_spec(spec: str, *, skip_bad: bool = False, seed: int = 0) -> tuple[list[Record], int]:
    """Load the source one spec string names (grammar in the module docstring)."""
    spec = spec.strip()
    body, limit = _split_limit(spec)
    if body == "synthetic" or body.startswith("synthetic:"):
        n, domains = _synthetic_args(body[len("synthetic:"):], spec)
        records, skipped = synthetic.generate_all(n, seed, domains), 0
    else:
        fmt, rest = _split_format(body, spec)
        records, skipped = _load_file(fmt, rest, spec, skip_bad)
    if limit is not None:
        records = records[:limit]
    return records, skipped
