"""From --data specs to training examples: load, split into source/target domains, hold
out evaluation records, tokenize."""
from __future__ import annotations

import random

from .format import encode
from .loaders import load_spec
from .split import split_domains
from .synthetic import SYNTHETIC_TARGET


def load_records(args):
    records, skipped = [], 0
    for spec in args.data:
        recs, n_bad = load_spec(spec, skip_bad=args.skip_bad, seed=args.seed)
        records += recs
        skipped += n_bad
    sources = args.source_domains.split(",") if args.source_domains else None
    targets = args.target_domains.split(",") if args.target_domains else None
    if targets is None and sources is None and all(s.startswith("synthetic") for s in args.data):
        if any(r.domain == SYNTHETIC_TARGET for r in records):
            targets = [SYNTHETIC_TARGET]
    records = split_domains(records, sources, targets)
    return records, skipped


def hold_out(records, per_domain: int, seed: int):
    """Split each domain into (train, eval): `per_domain` shuffled records are held out."""
    by_dom: dict[str, list] = {}
    for r in records:
        by_dom.setdefault(r.domain, []).append(r)
    train, evaluation = [], []
    for d in sorted(by_dom):
        recs = by_dom[d][:]
        random.Random(f"{seed}:{d}").shuffle(recs)
        k = min(per_domain, len(recs) // 2)
        evaluation += recs[:k]
        train += recs[k:]
    return train, evaluation


def encode_all(records, tok, args, domain_ids):
    examples, truncated = [], 0
    for r in records:
        ex = encode(r, tok, args.max_len, domain_ids[r.domain], truncate=args.on_long == "truncate")
        ex["n_labels"] = sum(1 for x in ex["labels"][1:] if x != -100)
        truncated += ex["truncated"]
        examples.append(ex)
    return examples, truncated
