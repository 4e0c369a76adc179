"""The synthetic generator: deterministic, short, and every answer actually right."""
from __future__ import annotations

import re

import pytest

from prada_fast.data import (DOMAINS, DataError, completion_text, generate, generate_all, load_spec,
                             prompt_text)
from prada_fast.data.synthetic import ALL_DOMAINS, NUMBER_WORDS, STORY_DOMAINS


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _check_arithmetic(question: str, rationale: str, answer: str) -> None:
    a, op1, b, op2, c = re.fullmatch(r"(\d)([+-])(\d)([+-])(\d)=\?", question).groups()
    first = _apply(int(a), op1, int(b))
    final = _apply(first, op2, int(c))
    assert answer == str(final) and 0 <= first <= 18 and 0 <= final <= 18
    assert rationale == f"{a}{op1}{b}={first}. {first}{op2}{c}={final}."


def _check_coinflip(question: str, rationale: str, answer: str) -> None:
    steps = re.fullmatch(r"Coin is heads\. (.*)\. Heads\?", question).group(1).lower().split(", ")
    assert 2 <= len(steps) <= 3 and set(steps) <= {"flip", "no flip"}
    heads = steps.count("flip") % 2 == 0
    assert answer == ("yes" if heads else "no")
    assert rationale.endswith("heads." if heads else "tails.")


def _check_lastletter(question: str, rationale: str, answer: str) -> None:
    words = re.fullmatch(r"Last letters of (\w+) (\w+)\?", question).groups()
    assert words[0] != words[1]
    assert answer == words[0][-1] + words[1][-1]
    assert rationale == f"{words[0]}->{words[0][-1]}. {words[1]}->{words[1][-1]}."


def _check_sorting(question: str, rationale: str, answer: str) -> None:
    digits = [int(d) for d in re.fullmatch(r"Sort (\d) (\d) (\d)\.", question).groups()]
    assert len(set(digits)) == 3
    assert answer == " ".join(str(d) for d in sorted(digits))
    assert rationale.startswith(f"min {min(digits)},")


CHECKS = {
    "arithmetic": _check_arithmetic,
    "coinflip": _check_coinflip,
    "lastletter": _check_lastletter,
    "sorting": _check_sorting,
}


def test_domains() -> None:
    assert DOMAINS == ("arithmetic", "coinflip", "lastletter", "sorting")


@pytest.mark.parametrize("domain", DOMAINS)
def test_answers_are_right(domain: str) -> None:
    for record in generate(domain, 300, seed=5):
        CHECKS[domain](record.question, record.rationale, record.answer)


@pytest.mark.parametrize("domain", STORY_DOMAINS)
def test_story_domains_share_the_arithmetic_skill(domain: str) -> None:
    """Every story states the numbers of its rationale, in order (digits, or words for
    wordshop), and the rationale's two steps are right."""
    words = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
    for record in generate(domain, 200, seed=3):
        a, op1, b, first, op2, c, final = re.fullmatch(
            r"(\d)([+-])(\d)=(\d+)\. \4([+-])(\d)=(\d+)\.", record.rationale).groups()
        assert int(first) == eval(f"{a}{op1}{b}") and int(final) == eval(f"{first}{op2}{c}")
        assert record.answer == final
        tokens = re.findall(r"\b(\d|" + "|".join(NUMBER_WORDS) + r")\b", record.question)
        assert [words.get(t, t) for t in tokens] == [a, b, c], record.question
        assert any(w in record.question for w in NUMBER_WORDS) == (domain == "wordshop")
    records, _ = load_spec(f"synthetic:5:{domain},arithmetic")
    assert {r.domain for r in records} == {domain, "arithmetic"}


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_short_examples(domain: str) -> None:
    for record in generate(domain, 300, seed=0):
        assert len(prompt_text(record) + completion_text(record)) <= 120


@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_deterministic_per_seed(domain: str) -> None:
    assert generate(domain, 50, seed=0) == generate(domain, 50, seed=0)
    assert generate(domain, 50, seed=0) != generate(domain, 50, seed=1)
    assert len({r.question for r in generate(domain, 50, seed=0)}) > 10


def test_generate_all() -> None:
    records = generate_all(3, seed=0)
    assert [r.domain for r in records[:4]] == list(DOMAINS)
    assert len(records) == 12 and all(r.labelled for r in records)
    assert records[0].origin == "synthetic:arithmetic:0"
    assert records[4].origin == "synthetic:arithmetic:1"
    assert {r.domain for r in generate_all(2, 0, ("sorting",))} == {"sorting"}
    with pytest.raises(DataError, match="unknown synthetic domain"):
        generate("chess", 1, 0)
