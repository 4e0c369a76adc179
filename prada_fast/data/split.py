"""Choose the source (labelled) and target (unlabelled) domains of a record list."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .records import DataError, Record


def domains_of(records: Iterable[Record]) -> list[str]:
    """The domains present, sorted and unique."""
    return sorted({record.domain for record in records})


def split_domains(
    records: list[Record],
    source_domains: list[str] | None,
    target_domains: list[str] | None,
) -> list[Record]:
    """Copies of the records of the named domains, source ones labelled, target ones not.

    ``source_domains=None`` means every domain not named as a target; ``target_domains=None``
    means none. Target records keep their rationale and answer (evaluation needs the gold
    answer); ``encode`` ignores them. Raises DataError for a named domain that is absent,
    one named both ways, a source record without an answer, or an empty result.
    """
    present = domains_of(records)
    targets = list(dict.fromkeys(target_domains or []))
    sources = list(dict.fromkeys(
        [d for d in present if d not in targets] if source_domains is None else source_domains
    ))
    for domain in [*sources, *targets]:
        if domain not in present:
            raise DataError(f"domain {domain!r} is not in the data; present: "
                            f"{', '.join(present) or 'none'}")
    both = sorted(set(sources) & set(targets))
    if both:
        raise DataError(f"domain(s) {', '.join(both)} named as both source and target")
    chosen: list[Record] = []
    for record in records:
        if record.domain in sources:
            if record.answer is None:
                raise DataError("a source-domain record needs an answer",
                                origin=record.origin, field="answer")
            chosen.append(replace(record, labelled=True))
        elif record.domain in targets:
            chosen.append(replace(record, labelled=False))
    if not chosen:
        raise DataError(f"no records left after the domain split (source: {sources}, "
                        f"target: {targets}; present: {', '.join(present) or 'none'})")
    return chosen
