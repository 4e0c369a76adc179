"""From --data specs to training examples: load, split into source/target domains, hold
out evaluation records, tokenize."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .format import encode
from .spec import load_spec
from .records import DataError
from .split import split_domains
from .synthetic import SYNTHETIC_TARGET


@dataclass(frozen=True)
class DataSettings:
    """What selects a run's records and holds some out: the --data flags. `manifest()` is
    how a teacher cache records them (its "data" field)."""
    specs: tuple[str, ...] = ("synthetic",)
    source_domains: str | None = None   # comma-separated; None: every domain not a target
    target_domains: str | None = None   # comma-separated; None: the synthetic target, if any
    skip_bad: bool = False
    eval_per_domain: int = 64
    seed: int = 0

    def manifest(self) -> dict:
        return {"data": list(self.specs), "source_domains": self.source_domains,
                "target_domains": self.target_domains, "skip_bad": self.skip_bad,
                "eval_per_domain": self.eval_per_domain, "seed": self.seed}


@dataclass
class RunData:
    """A run's records (split into training and held-out) and, once the student's
    tokenizer is known, their encoded examples."""
    domains: list
    roles: dict           # domain -> "source" (labelled) | "target" (unlabelled records)
    train_records: list
    eval_records: list
    skipped: int          # bad records skipped while loading
    train: list | None = None       # encoded examples
    eval: list | None = None
    truncated: int = 0
    lengths: dict | None = None     # the training records' length distribution vs --max-len
    collate: object | None = None   # data.format.Collator of the student's tokenizer

    def describe(self) -> str:
        return (f"{len(self.train_records)} training / {len(self.eval_records)} held-out records; "
                "domains " + ", ".join(f"{d} ({self.roles[d]})" for d in self.domains)
                + (f"; {self.skipped} bad records skipped" if self.skipped else ""))


def load_records(settings: DataSettings):
    """(records with their roles, bad records skipped)."""
    records, skipped = [], 0
    for spec in settings.specs:
        recs, n_bad = load_spec(spec, skip_bad=settings.skip_bad, seed=settings.seed)
        records += recs
        skipped += n_bad
    sources = settings.source_domains.split(",") if settings.source_domains else None
    targets = settings.target_domains.split(",") if settings.target_domains else None
    if targets is None and sources is None and all(s.startswith("synthetic") for s in settings.specs):
        if any(r.domain == SYNTHETIC_TARGET for r in records):
            targets = [SYNTHETIC_TARGET]
    records = split_domains(records, sources, targets)
    return records, skipped


def load_run_data(settings: DataSettings) -> RunData:
    """The records, their domains (a domain with unlabelled records is a target), and the
    held-out split."""
    records, skipped = load_records(settings)
    domains = sorted({r.domain for r in records})
    roles = {d: "target" if any(r.domain == d and not r.labelled for r in records) else "source"
             for d in domains}
    train_recs, eval_recs = hold_out(records, settings.eval_per_domain, settings.seed)
    return RunData(domains, roles, train_recs, eval_recs, skipped)


def hold_out(records, per_domain: int, seed: int):
    """Split each domain into (train, eval) by question: `per_domain` shuffled questions are
    held out, once each. A question is its text (whitespace-normalised) within its domain, or
    its `question_id`: records that share either (several teacher rationales of one question,
    or the same question drawn twice) never straddle the split, so no held-out question is
    also a training record, labelled or not."""
    parent = list(range(len(records)))  # union-find over records: one set per question

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}  # (domain, "text", text) or (domain, "id", question_id) -> a record index
    for i, r in enumerate(records):
        names = [(r.domain, "text", " ".join(r.question.split()))]
        if r.question_id is not None:
            names.append((r.domain, "id", r.question_id))
        for n in names:
            parent[root(i)] = root(first.setdefault(n, i))
    by_dom: dict[str, dict] = {}
    for i, r in enumerate(records):
        by_dom.setdefault(r.domain, {}).setdefault(root(i), []).append(r)
    train, evaluation = [], []
    for d in sorted(by_dom):
        groups = list(by_dom[d].values())
        random.Random(f"{seed}:{d}").shuffle(groups)
        k = min(per_domain, len(groups) // 2)
        evaluation += [g[0] for g in groups[:k]]
        train += [r for g in groups[k:] for r in g]
    return train, evaluation


def encode_all(records, tok, max_len: int, domain_ids):
    """(encoded examples, length statistics: see `length_stats`). Records longer than
    `max_len` are cut here; whether that is acceptable is `check_lengths`'s call."""
    examples, qids = [], {}
    for i, r in enumerate(records):
        ex = encode(r, tok, max_len, domain_ids[r.domain], truncate=True)
        # one id per question: the rationales of one question count once in the domain loss
        ex["qid"] = qids.setdefault(i if r.question_id is None else r.question_id, len(qids))
        ex["n_labels"] = sum(1 for x in ex["labels"][1:] if x != -100)
        ex["labelled"] = r.labelled
        ex["origin"] = r.origin
        examples.append(ex)
    return examples, length_stats(examples, max_len)


def _spread(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "p90": v[min(len(v) - 1, (9 * len(v)) // 10)],
            "max": v[-1]}


def length_stats(examples: list[dict], max_len: int) -> dict:
    """The length distribution against --max-len: tokens per record (before any cut),
    labelled tokens per labelled record (after the cut), how many records were cut and how
    many labelled ones kept no labelled token (unusable), and the --max-len that would keep
    every record whole, or at least one labelled token of each unusable one."""
    labelled = [ex for ex in examples if ex["labelled"]]
    over = [ex for ex in examples if ex["truncated"]]
    unusable = [ex for ex in labelled if ex["n_labels"] == 0]
    return {
        "max_len": max_len, "records": len(examples), "labelled_records": len(labelled),
        "tokens": _spread([ex["length"] for ex in examples]),
        "labelled_tokens": _spread([ex["n_labels"] for ex in labelled]),
        "labelled_tokens_total": sum(ex["n_labels"] for ex in labelled),
        "truncated": len(over), "first_truncated": over[0]["origin"] if over else None,
        "unusable": len(unusable), "first_unusable": unusable[0]["origin"] if unusable else None,
        "max_len_whole": max((ex["length"] for ex in examples), default=0),
        "max_len_one_label": max((ex["prompt_length"] + 1 for ex in unusable), default=None),
    }


def describe_lengths(stats: dict) -> str:
    """One line: the length distribution against --max-len."""
    def fmt(d):
        return " / ".join(f"{k} {v}" for k, v in d.items()) if d else "-"
    line = (f"lengths at --max-len {stats['max_len']}: tokens per record {fmt(stats['tokens'])}; "
            f"labelled tokens per labelled record, after any cut, {fmt(stats['labelled_tokens'])}; "
            f"{stats['truncated']} of {stats['records']} records cut")
    if stats["unusable"]:
        line += f", {stats['unusable']} labelled records left with no labelled token"
    return line


def check_lengths(stats: dict, on_long: str | None) -> str | None:
    """Refuse training data that cannot teach (DataError), given --on-long: None (the
    default) cuts over-long records as long as each labelled one keeps a labelled token;
    "refuse" stops at any over-long record; "truncate" also accepts labelled records cut to
    nothing, provided some labelled token remains. Returns a warning line or None."""
    n, u, L = stats["records"], stats["unusable"], stats["max_len"]
    whole = stats["max_len_whole"]
    if stats["labelled_records"] == 0:
        raise DataError("no labelled (source-domain) record among the training records: nothing "
                        "to distil (name a source domain with --source-domains)")
    if on_long == "refuse" and stats["truncated"]:
        raise DataError(f"{stats['truncated']} of {n} training records are longer than --max-len {L} "
                        f"tokens (first: {stats['first_truncated']}; longest {whole}): --max-len {whole} "
                        "keeps every record whole, or --on-long truncate cuts them")
    if not u:
        return None
    what = (f"{u} of {stats['labelled_records']} labelled training records keep no labelled token "
            f"at --max-len {L}: the prompt alone fills the row (first: {stats['first_unusable']})")
    if on_long != "truncate":
        raise DataError(f"{what}. --max-len {stats['max_len_one_label']} keeps at least one labelled "
                        f"token of each, --max-len {whole} every record whole; or pass --on-long "
                        "truncate to train on the labelled tokens that remain")
    if stats["labelled_tokens_total"] == 0:
        raise DataError(f"no labelled token is left at --max-len {L}: every labelled record is cut "
                        f"to its prompt; --max-len {stats['max_len_one_label']} keeps at least one "
                        "labelled token of each")
    return (f"warning: {what}; --on-long truncate: they train the domain loss only "
            f"(--max-len {stats['max_len_one_label']} would keep a labelled token of each)")


def load_answered(specs, *, skip_bad: bool = False, seed: int = 0):
    """The records of the specs that have a gold answer, in order, each spec whole or its
    first N (`#N`): the evaluation's input. Returns (records, bad records skipped, records
    without an answer left out); DataError when none has an answer."""
    records, skipped, unanswered = [], 0, 0
    for spec in specs:
        recs, n_bad = load_spec(spec, skip_bad=skip_bad, seed=seed)
        skipped += n_bad
        unanswered += sum(r.answer is None for r in recs)
        records += [r for r in recs if r.answer is not None]
    if not records:
        raise DataError(f"--data {' '.join(specs)}: no record with a gold answer to grade")
    return records, skipped, unanswered
