"""A built-in generator of small multi-domain chain-of-thought problems (no download).

Four domains with checkable answers, each example short (well under 120 characters once
formatted), with a small vocabulary and a regular rationale so that a tiny byte-level
model can learn them in minutes:

- ``arithmetic``: ``3+5-2=?`` -> ``3+5=8. 8-2=6.`` -> ``6``
- ``coinflip``:   ``Coin is heads. Flip, no flip, flip. Heads?``
                  -> ``heads, tails, tails, heads.`` -> ``yes``
- ``lastletter``: ``Last letters of cat dog?`` -> ``cat->t. dog->g.`` -> ``tg``
- ``sorting``:    ``Sort 7 2 5.`` -> ``min 2, then 5, then 7.`` -> ``2 5 7``

A family of story domains shares one skill, two-step single-digit arithmetic with the
rationale of ``arithmetic`` (``7+5=12. 12-3=9.``), and differs only in how the question is
told, so that what is learnt on some can transfer to the others (not in the default set;
name them, e.g. ``synthetic:400:shopping,travel,recipes,garden``):

- ``shopping``: ``Ann has 7 apples. She buys 5, then gives away 3. How many now?``
- ``travel``:   ``A bus has 7 riders. 5 get on, then 3 get off. How many now?``
- ``recipes``:  ``A bowl has 7 eggs. You add 5, then use 3. How many now?``
- ``garden``:   ``A tree has 7 birds. 5 land, then 3 fly away. How many now?``
- ``wordshop``: ``shopping`` with the numbers in words (``Ann has seven apples. ...``): a
  larger shift of surface form, for a student that has seen number words.
- ``market``:   ``Bob has 7 pears. He buys 5, then gives away 3. How many now?``
  (``shopping``'s verbs, told of someone else)
- ``zoo``:      ``A zoo has 7 lions. 5 get on, then 3 get off. How many now?``
  (``travel``'s verbs in another opening)
- ``harbor``:   ``A ship has 7 crates. 5 are loaded, then 3 are unloaded. How many now?``

How far plain CoT distillation carries from sources shopping, travel and recipes (tiny
student, 600 steps, one seed, 100 held-out records each; sources 0.40-0.50): zoo 0.45 (all
of it), market 0.26 (part of it), harbor 0.10 and garden 0.08 (their verbs never appear
labelled), wordshop 0.02. ``market`` is thus a target that shares the skill and part of the
surface form: the story benchmark of the comparison.

Generation is deterministic given the seed: each domain draws from its own
``random.Random(f"{seed}:{domain}")``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .records import DataError, Record

DOMAINS = ("arithmetic", "coinflip", "lastletter", "sorting")  # the default set
SYNTHETIC_TARGET = "sorting"  # the default unlabelled (target) domain of the synthetic data
STORY_DOMAINS = ("shopping", "travel", "recipes", "garden", "wordshop", "market", "zoo", "harbor")
ALL_DOMAINS = DOMAINS + STORY_DOMAINS
# The comparison's story benchmark: market is the target, zoo the pseudo-target its knobs
# are tuned on (zoo re-tells travel as market re-tells shopping).
STORY_BENCHMARK = "synthetic:400:shopping,market,travel,zoo,recipes"
STORY_TARGET, STORY_PSEUDO_TARGET = "market", "zoo"

WORDS = (
    "cat", "dog", "sun", "car", "bus", "map", "cup", "pen", "hat", "box",
    "bed", "egg", "fox", "owl", "ant", "bee", "pig", "cow", "hen", "key",
    "red", "sky", "sea", "ice", "tea", "jam", "bag", "net", "toy", "van",
    "book", "milk", "fish", "bird", "tree", "door", "rain", "snow", "star", "moon",
    "lamp", "ship", "frog", "duck", "lion", "wolf", "cake", "rice", "song", "king",
)

Problem = tuple[str, str, str]  # question, rationale, answer


def _two_steps(rng: random.Random) -> tuple[int, str, int, str, int, int, int]:
    """a op1 b op2 c with single digits, every result in 0..18: (a, op1, b, op2, c, first, final)."""
    while True:
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        first = a + b if op1 == "+" else a - b
        final = first + c if op2 == "+" else first - c
        if 0 <= first <= 18 and 0 <= final <= 18:
            return a, op1, b, op2, c, first, final


def _arithmetic(rng: random.Random) -> Problem:
    """Two single-digit steps of + or -, every result in 0..18."""
    a, op1, b, op2, c, first, final = _two_steps(rng)
    question = f"{a}{op1}{b}{op2}{c}=?"
    rationale = f"{a}{op1}{b}={first}. {first}{op2}{c}={final}."
    return question, rationale, str(final)


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Story templates: the opening (with the start count {a}), then the two steps, each a phrase
# that adds or removes {n}. The rationale is arithmetic's.
STORIES = {
    "shopping": ("Ann has {a} apples. She {s1}, then {s2}. How many now?",
                 "buys {n}", "gives away {n}"),
    "travel": ("A bus has {a} riders. {s1}, then {s2}. How many now?", "{n} get on", "{n} get off"),
    "recipes": ("A bowl has {a} eggs. You {s1}, then {s2}. How many now?", "add {n}", "use {n}"),
    "garden": ("A tree has {a} birds. {s1}, then {s2}. How many now?", "{n} land", "{n} fly away"),
    "market": ("Bob has {a} pears. He {s1}, then {s2}. How many now?", "buys {n}", "gives away {n}"),
    "zoo": ("A zoo has {a} lions. {s1}, then {s2}. How many now?", "{n} get on", "{n} get off"),
    "harbor": ("A ship has {a} crates. {s1}, then {s2}. How many now?", "{n} are loaded", "{n} are unloaded"),
}


def _story(domain: str, words: bool = False) -> Callable[[random.Random], Problem]:
    """Arithmetic told as the story `domain` (numbers in words with `words`)."""
    opening, add, remove = STORIES[domain]

    def make(rng: random.Random) -> Problem:
        a, op1, b, op2, c, first, final = _two_steps(rng)
        num = (lambda x: NUMBER_WORDS[x]) if words else str
        s1 = (add if op1 == "+" else remove).format(n=num(b))
        s2 = (add if op2 == "+" else remove).format(n=num(c))
        question = opening.format(a=num(a), s1=s1, s2=s2)
        question = question[0].upper() + question[1:]
        rationale = f"{a}{op1}{b}={first}. {first}{op2}{c}={final}."
        return question, rationale, str(final)

    return make


def _coinflip(rng: random.Random) -> Problem:
    """A coin starts heads up; 2-3 steps each flip it or not."""
    flips = [rng.random() < 0.5 for _ in range(rng.randint(2, 3))]
    states = ["heads"]
    for flip in flips:
        last = states[-1]
        states.append(("tails" if last == "heads" else "heads") if flip else last)
    steps = ", ".join("flip" if flip else "no flip" for flip in flips)
    question = f"Coin is heads. {steps.capitalize()}. Heads?"
    rationale = ", ".join(states) + "."
    return question, rationale, "yes" if states[-1] == "heads" else "no"


def _lastletter(rng: random.Random) -> Problem:
    """Concatenate the last letters of two distinct short words."""
    words = rng.sample(WORDS, 2)
    question = f"Last letters of {' '.join(words)}?"
    rationale = " ".join(f"{word}->{word[-1]}." for word in words)
    return question, rationale, "".join(word[-1] for word in words)


def _sorting(rng: random.Random) -> Problem:
    """Sort three distinct digits, naming the smallest first."""
    digits = rng.sample(range(10), 3)
    ordered = sorted(digits)
    question = f"Sort {' '.join(map(str, digits))}."
    rationale = f"min {ordered[0]}, then {ordered[1]}, then {ordered[2]}."
    return question, rationale, " ".join(map(str, ordered))


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic,
    "coinflip": _coinflip,
    "lastletter": _lastletter,
    "sorting": _sorting,
    **{d: _story(d) for d in STORIES},
    "wordshop": _story("shopping", words=True),
}


def generate(domain: str, n: int, seed: int) -> list[Record]:
    """``n`` problems of one domain, the same for the same seed."""
    if domain not in _GENERATORS:
        raise DataError(f"unknown synthetic domain {domain!r}; known: {', '.join(ALL_DOMAINS)}")
    rng = random.Random(f"{seed}:{domain}")
    records = []
    for i in range(n):
        question, rationale, answer = _GENERATORS[domain](rng)
        records.append(Record(question, rationale, answer, domain, origin=f"synthetic:{domain}:{i}"))
    return records


def generate_all(n_per_domain: int, seed: int, domains: Sequence[str] = DOMAINS) -> list[Record]:
    """``n_per_domain`` problems of each domain, interleaved round-robin."""
    per_domain = [generate(domain, n_per_domain, seed) for domain in domains]
    return [record for group in zip(*per_domain) for record in group]
