"""The ``--data`` grammar: a spec string names a source and its options; ``check_spec``
checks one without reading data, ``load_spec`` reads it with the per-format readers of
:mod:`prada_fast.data.loaders`.

Data spec grammar (``load_spec``, the ``--data`` flag)::

    synthetic                     built-in generator, 400 records per domain, all domains
    synthetic:N                   N records per domain
    synthetic:N:dom1,dom2         N records of the named domains (arithmetic, coinflip,
                                  lastletter, sorting, and the story domains shopping,
                                  travel, recipes, garden, wordshop, market, zoo, harbor)
    PATH                          a file whose name says its format: gsm8k*.jsonl,
                                  aqua*.json(l), strategyqa*.json; or the JSON lines
                                  that `python -m prada_fast.rationales` writes
    FORMAT:PATH                   FORMAT is gsm8k | aqua | strategyqa | jsonl | hf |
                                  rationales
    ...?key=value&key=value       options:
                                    every format: domain=NAME (the domain's name)
                                    jsonl, hf: question=COL rationale=COL answer=COL
                                      (default: columns named question, rationale,
                                      answer), domain_field=COL (domain read per row;
                                      default domain: the file's stem or dataset's name);
                                      a column may be a template joining several,
                                      question={Body} {Question}; jsonl also reads a
                                      file holding one JSON array
                                    hf only: split=NAME (default train), config=NAME
    ...#N                         keep the first N records

Examples: ``/data/gsm8k_train.jsonl#300``, ``aqua:/data/aqua_dev.json?domain=algebra``,
``jsonl:/p/x.jsonl?question=q&rationale=r&answer=a&domain=math``,
``jsonl:/p/SVAMP.json?question={Body} {Question}&answer=Answer&domain=svamp``,
``hf:/p/parquet_dir?split=test&domain_field=task``, ``hf:openai/gsm8k?config=main``
(a hub name needs network).
"""
from __future__ import annotations

import re
from pathlib import Path

from . import synthetic
from .loaders import (
    _COLUMN_KEYS,
    _is_rationales_file,
    load_aqua,
    load_gsm8k,
    load_hf,
    load_jsonl,
    load_rationales,
    load_strategyqa,
)
from .records import DataError, Record

FORMATS = ("gsm8k", "aqua", "strategyqa", "jsonl", "hf", "rationales")
DEFAULT_SYNTHETIC_N = 400

_LIMIT = re.compile(r"#(\d+)$")
_FORMAT_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", re.DOTALL)


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
                f"unknown option {key!r}; this format takes {', '.join(allowed) or 'no options'}",
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
    if name.endswith(".jsonl") and Path(path).is_file() and _is_rationales_file(Path(path)):
        return "rationales"
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
    allowed = {"jsonl": table_keys, "hf": (*table_keys, "split", "config"),
               "rationales": ()}.get(fmt, ("domain",))
    options = _parse_options(option_text, allowed, spec)
    if not target:
        raise DataError("no path after the format", origin=repr(spec))
    if fmt != "hf" and not Path(target).is_file():
        raise DataError(f"no such file: {target}", origin=repr(spec))
    return target, options


def _load_file(fmt: str, rest: str, spec: str, skip_bad: bool) -> tuple[list[Record], int]:
    target, options = _file_args(fmt, rest, spec)
    if fmt == "rationales":
        return load_rationales(target, skip_bad=skip_bad)
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
