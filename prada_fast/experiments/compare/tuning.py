"""--tune: the knobs of each adversarial variant, chosen per target on a pseudo-target
split of the sources (the real target's records never looked at)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from prada_fast.data.synthetic import STORY_PSEUDO_TARGET, STORY_TARGET

from .flags import data_domains
from .runs import default_knobs, drop_weights, ensure_run, finished, log, trainer_args
from .statistics import _f, _mean
from .variants import ADVERSARIES, Variant, variants


def _tag(knobs: dict, v: Variant) -> str:
    tag = f"lam{knobs['lambda_max']:g}-mult{knobs['head_lr_mult']:g}" if v.trains_domain_head else "base"
    if v.trains_domain_head and knobs.get("domain_steps"):
        tag += f"-d{knobs['domain_steps']}"
    return (tag + (f"-enc{knobs['prompt_encoder']}" if v.has_prompt else "")
            + (f"-lm{knobs['lm_weight']:g}" if v.lm else ""))


def _best(grid: list[dict], score, reference: float | None, budget: float) -> dict:
    """The grid's setting with the best pseudo-target accuracy (ties: source accuracy, then
    grid order) among those whose source accuracy is at most `budget` below the (A)
    reference's on the same split; when none is, the one with the best source accuracy (the
    smallest cost). score(knobs) gives the setting's tuning-table row, marked here. A grid of
    one is chosen without a run."""
    if len(grid) == 1:
        return grid[0]
    rows = [score(kn) for kn in grid]
    if reference is None:
        log(f"tune: no source accuracy of the (A) reference: {rows[0]['variant']} is chosen "
            "without --tune-source-drop")
    for row in rows:  # a setting without a finished run is never within
        row["within_source_budget"] = row["source_accuracy"] is not None and (
            reference is None or row["source_accuracy"] >= reference - budget - 1e-9)
    acc = [(row["pseudo_target_accuracy"] or 0.0, row["source_accuracy"] or 0.0) for row in rows]
    ok = [i for i, row in enumerate(rows) if row["within_source_budget"]]
    if ok:
        return grid[max(ok, key=lambda i: acc[i])]
    best = max(range(len(rows)), key=lambda i: acc[i][::-1])
    rows[best]["least_costly"] = True  # chosen although over the budget: the report says so
    log(f"tune: no setting of {rows[0]['variant']} keeps the source accuracy within "
        f"{budget:g} of the reference's {_f(reference)}; the one that costs the least is chosen")
    return grid[best]


def tune_split(args, target: str) -> tuple[str, list[str]]:
    """(pseudo-target, the remaining sources) for a target: the real target is left out."""
    sources = [d for d in data_domains(args.data) if d != target]
    pseudo = args.pseudo_target or (STORY_PSEUDO_TARGET if target == STORY_TARGET and
                                    STORY_PSEUDO_TARGET in sources else sorted(sources)[0])
    if pseudo not in sources:
        raise SystemExit(f"error: --pseudo-target {pseudo}: not one of the sources {sources}")
    rest = [d for d in sources if d != pseudo]
    if not rest:
        raise SystemExit(f"error: tuning for target {target} needs two sources or more")
    return pseudo, rest


def tune(args, target: str, walls: list[float]) -> dict[str, dict]:
    """The knobs of each variant for `target`, chosen on a pseudo-target (see --tune's
    help). Writes OUTPUT_DIR/tune/<target>/chosen.json with every setting's scores."""
    V = variants(args.prompt_len)
    out = args.output_dir / "tune" / target / "chosen.json"
    if args.report_only and out.is_file():  # the choice already made; nothing retrained
        saved = json.loads(out.read_text())["chosen"]
        return {k: {**default_knobs(args), **saved.get(k, {})} for k in args.variants}
    pseudo, rest = tune_split(args, target)
    table = []

    def run(v: Variant, knobs: dict, seed: int) -> tuple:
        """(directory, trainer flags, log tag) of one tuning run."""
        d = args.output_dir / "tune" / target / v.key / _tag(knobs, v) / f"seed{seed}"
        return (d, trainer_args(args, pseudo, v, seed, knobs, sources=rest, out=d),
                f"tune target={target} (pseudo {pseudo}) {v.key} {_tag(knobs, v)} seed={seed}")

    fitted = []  # with the auto teacher: whether a run has fitted the tuning split's teacher

    def prefetch(points: list[tuple[Variant, dict]]) -> None:
        """Train the unfinished runs of one stage's grid points (they do not depend on each
        other) --jobs at once, before score takes them one by one and finds them finished.
        With the auto teacher the first of all trains alone: it fits the teacher they share."""
        if args.jobs < 2 or args.report_only:
            return
        todo = {}  # by directory: a repeated grid value is one run
        for v, kn in points:
            for seed in args.tune_seeds:
                d, argv, tag = run(v, kn, seed)
                if not finished(d):
                    todo.setdefault(d, (d, argv, tag))
        todo = list(todo.values())
        if todo and args.teacher == "auto" and not fitted:
            ensure_run(args, todo[0][1], todo[0][0], todo[0][2], walls, alone=True)
            todo = todo[1:]
            fitted.append(True)
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        try:
            for f in [pool.submit(ensure_run, args, argv, d, tag, walls) for d, argv, tag in todo]:
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score(v: Variant, knobs: dict) -> tuple[float, float]:
        pa, sa = [], []
        for seed in args.tune_seeds:
            d, argv, tag = run(v, knobs, seed)
            status, _ = ensure_run(args, argv, d, tag, walls, alone=True)
            if status == "missing":
                continue
            if args.drop_weights:
                drop_weights(d, args.probe_folds)
            acc = {k: x["accuracy_after"] for k, x in
                   json.loads((d / "summary.json").read_text())["domains"].items()}
            pa.append(acc[pseudo])
            sa.append(_mean([acc[x] for x in rest]))
        row = {"variant": v.key, "knobs": knobs if v.trains_domain_head or v.lm else None,
               "pseudo_target_accuracy": _mean(pa), "source_accuracy": _mean(sa), "n_seeds": len(pa)}
        table.append(row)
        log(f"tune target={target} {v.key} {_tag(knobs, v)}: pseudo-target {pseudo} "
            f"{_f(row['pseudo_target_accuracy'])}, sources {_f(row['source_accuracy'])}")
        return row

    base = default_knobs(args)
    chosen = {k: dict(base) for k in args.variants}
    lm_grid = [{**base, "lm_weight": w} for w in args.tune_lm_weights]
    adv_grid = [{**base, "lambda_max": lam, "head_lr_mult": mult, "prompt_encoder": "none"}
                for lam in args.tune_lambdas for mult in args.tune_head_mults]
    tuned_lm = any(V[k].lm for k in args.variants)
    adversaries = [a for a in ADVERSARIES if {a, f"prada-{a}", f"prada-{a}-lm"} & set(args.variants)]
    # the first stage's runs (the reference, the LM weights, each adversary's knobs) train at
    # once; a grid of one is chosen without a run
    prefetch([(V["cot"], base)]
             + [(V["cot-lm"], kn) for kn in lm_grid if tuned_lm and len(lm_grid) > 1]
             + [(V[a], kn) for a in adversaries for kn in adv_grid if len(adv_grid) > 1])
    # the (A) reference on the same split: the source accuracy a setting may lose against it
    # is --tune-source-drop
    reference = score(V["cot"], base)["source_accuracy"]
    budget = args.tune_source_drop
    lm_weight = base["lm_weight"]
    if tuned_lm:  # the LM weight, on CoT + LM (B)
        lm_weight = _best(lm_grid, lambda kn: score(V["cot-lm"], kn), reference, budget)["lm_weight"]
        if "cot-lm" in args.variants:
            chosen["cot-lm"] = {**base, "lm_weight": lm_weight}
    for adv in adversaries:
        prada = [k for k in (f"prada-{adv}", f"prada-{adv}-lm") if k in args.variants]
        # the adversary's knobs on the adversary alone, then the encoder on PRADA (C); PRADA + LM
        # (D) takes both and the LM weight chosen on (B)
        best = _best(adv_grid, lambda kn, v=V[adv]: score(v, kn), reference, budget)
        if adv in args.variants:
            chosen[adv] = best
        if prada:
            enc_grid = [{**best, "prompt_encoder": e} for e in args.tune_prompt_encoders]
            if len(enc_grid) > 1:
                prefetch([(V[f"prada-{adv}"], kn) for kn in enc_grid])
            enc = _best(enc_grid, lambda kn, v=V[f"prada-{adv}"]: score(v, kn), reference, budget)
            for k in prada:
                chosen[k] = {**enc, "lm_weight": lm_weight} if V[k].lm else enc
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "pseudo_target": pseudo, "sources": rest,
                               "seeds": args.tune_seeds, "source_drop": budget,
                               "reference_source_accuracy": reference, "chosen": chosen, "tried": table},
                              indent=2) + "\n")
    log(f"tune target={target}: chosen " + "; ".join(
        f"{k} {_tag(kn, V[k])}" for k, kn in chosen.items() if V[k].trains_domain_head or V[k].lm))
    return chosen
