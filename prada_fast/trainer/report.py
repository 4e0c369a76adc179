"""The end-of-run table."""
from __future__ import annotations


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_rows(rows: list[tuple[str, ...]], footer: int = 0) -> None:
    """A table: the first row its header, the last `footer` rows below a rule."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for i, r in enumerate(rows):
        if i == len(rows) - footer and footer:
            print(line)
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print(line)
    print(line)


def print_table(summary: dict) -> None:
    rows = [("domain", "role", "acc before", "acc after")]
    for d, v in summary["domains"].items():
        rows.append((d, v["role"], _fmt(v["accuracy_before"]), _fmt(v["accuracy_after"])))
    print_rows(rows)
    print(f"domain classifier accuracy: {_fmt(summary['domain_classifier_accuracy'])} "
          f"(before {_fmt(summary.get('domain_classifier_accuracy_before'))}, chance "
          f"{1 / max(len(summary['domains']), 1):.3f}); fresh probe on the pooled question "
          f"features: {_fmt(summary.get('domain_probe_accuracy'))} "
          f"(before {_fmt((summary.get('domain_alignment') or {}).get('probe_accuracy_before'))})")
    align = summary.get("domain_alignment") or {}
    if align.get("layer_probe_accuracy"):
        print("fresh probe per layer (0: embeddings ... final): before "
              + " ".join(map(_fmt, align.get("layer_probe_accuracy_before") or [])) + ", after "
              + " ".join(map(_fmt, align["layer_probe_accuracy"])))
    print(f"final loss {summary['final_loss']:.4f}  steps {summary['steps']}  "
          f"tokens/s {summary['tokens_per_s']:.0f} (real tokens; padding "
          f"{summary.get('padding_fraction', 0):.1%} of positions)  wall {summary['wall_seconds']}s",
          flush=True)


def print_accuracy_table(report: dict) -> None:
    """`python -m prada_fast.evaluate`'s table: per domain and overall, records, correct
    answers and accuracy."""
    rows = [("domain", "records", "correct", "accuracy")]
    for d, v in report["domains"].items():
        rows.append((d, str(v["records"]), str(v["correct"]), _fmt(v["accuracy"])))
    rows.append(("all", str(report["records"]), str(report["correct"]), _fmt(report["accuracy"])))
    print_rows(rows, footer=1)
    print(f"{report['seconds']}s on {report['ranks']} rank(s)", flush=True)
