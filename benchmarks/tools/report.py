"""Turn a pytest-benchmark JSON of this suite into a markdown table and PNG plots.

    python -m benchmarks.tools.report benchmarks/out/bench.json [--out benchmarks/out]
        [--update-results benchmarks/RESULTS.md]

Writes OUT/table.md (op cases: time, peak extra memory, their ratios to the reference,
TFLOP/s and the fraction of the matrix-product ceiling, parity; training steps: tokens/s and
memory), OUT/time_vs_vocab.png and OUT/memory_vs_vocab.png (one line per implementation,
one panel per (N, H, H_t, dtype)), and OUT/results_section.md: the block that
benchmarks/RESULTS.md keeps per device (date, versions, machine, command, tables).
--update-results replaces that device's block in RESULTS.md (between its markers).
`pytest benchmarks/` runs this at the end by itself.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

MiB = 2**20


def _load(path) -> dict:
    return json.loads(Path(path).read_text())


def _entries(data: dict, kind: str) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        ex = b.get("extra_info") or {}
        if ex.get("kind") == kind:
            rows.append({**ex, "stats": b.get("stats", {}), "name": b.get("name")})
    return rows


def fmt(v, spec=".2f", none="–", *, scale=1.0, unit="") -> str:
    """`v * scale` formatted with `spec`, then `unit`; `none` where v is missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v * scale if scale != 1 else v, spec) + unit


def max_err(errs: dict | None) -> float | None:
    """The largest of a result's relative errors against the oracle (None: not checked)."""
    if not errs:
        return None
    vals = [float(v) for v in errs.values()]
    return max(vals) if vals else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def md_table(header: list[str], align: str, rows) -> str:
    """A markdown table; `align`: one letter per column, l(eft) or r(ight)."""
    rule = "|" + "|".join("---:" if c == "r" else "---" for c in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule,
                      *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def op_rows(data: dict) -> list[dict]:
    """The op results of a benchmark JSON, by (dtype, H_t, H, N, V), each labelled `case`."""
    by_case: dict[str, list[dict]] = {}
    for r in _entries(data, "op"):
        by_case.setdefault(r["case_id"], []).append(r)

    def key(c):
        r = by_case[c][0]
        return (r["dtype"], r["Ht"], r["H"], r["N"], r["V"])
    return [{**r, "case": f"{r['N']} x {r['H']} x {r['V']}, {r['Ht'] or '-'} {r['dtype']}"}
            for c in sorted(by_case, key=key) for r in by_case[c]]


def op_table(rows: list[dict], *, vs=("reference",), ceiling: float | None = None, chunk: bool = False,
             case_header: str = "case") -> str:
    """Markdown table of op results, a line per row in the given order. A row has case (a
    label), impl, median_s, peak_extra_bytes, tflops; maybe frac_of_ceiling (else tflops /
    `ceiling`), errors (relative errors against the oracle), oom, parity_failures and
    chunk_rows (a column with `chunk`). Times are compared with each implementation of `vs`
    on the same case, memory with the first of them."""
    if not rows:
        return ""

    def case(r):  # the case a row measures (its label may leave out some of the case's fields)
        return r.get("case_id", r["case"])
    base = {}
    for r in rows:
        if r["impl"] in vs and r.get("median_s"):
            base.setdefault((case(r), r["impl"]), r)
    header = [case_header, "impl", *(["rows per chunk"] if chunk else []), "median s",
              *(f"time vs {v}" for v in vs), "peak extra MiB", f"memory vs {vs[0]}", "TFLOP/s",
              "% of matmul ceiling", "max parity error"]
    lines = []
    for r in rows:
        t, m = r.get("median_s"), r.get("peak_extra_bytes")
        ref = base.get((case(r), vs[0]))
        frac = r.get("frac_of_ceiling") or _ratio(r.get("tflops"), ceiling)
        err = "OOM" if r.get("oom") else fmt(max_err(r.get("errors")), ".1e")
        if r.get("parity_failures") and r["parity_failures"] != ["not checked"]:
            err += " FAIL"
        lines.append([r["case"], r["impl"], *([r.get("chunk_rows") or "auto"] if chunk else []),
                      fmt(t, ".4g"),
                      *(fmt(_ratio(t, (base.get((case(r), v)) or {}).get("median_s"))) for v in vs),
                      fmt(m, ".0f", scale=1 / MiB),
                      fmt(_ratio(m, ref and max(ref["peak_extra_bytes"], 1)), ".3f"),
                      fmt(r.get("tflops"), ".3g"), fmt(frac, ".0f", scale=100), err])
    return md_table(header, "ll" + "r" * (len(header) - 2), lines)


def train_table(rows: list[dict], *, extra=()) -> str:
    """Markdown table of training steps, a line per row: student, teacher, bf16, V, batch, seq,
    impl, tokens_per_s, median_s, peak_extra_bytes, peak_total_bytes, maybe oom; rates and
    memory compared with the reference row. `extra`: more columns, (header, row -> cell)."""
    if not rows:
        return ""
    ref = next((r for r in rows if r["impl"] == "reference" and r.get("tokens_per_s")), None)
    header = ["student + teacher", "V", "tokens/step", "loss impl", "tokens/s", "vs reference", "step s",
              "peak extra MiB", "memory vs reference", "peak total MiB", *(h for h, _ in extra)]
    lines = []
    for r in rows:
        tok, m = r.get("tokens_per_s"), r.get("peak_extra_bytes")
        models = f"{r['student']} + {r['teacher']}{' (bf16)' if r.get('bf16') else ''}"
        lines.append([models, fmt(r.get("V"), "d"), f"{r['batch']} x {r['seq']}", r["impl"],
                      "OOM" if r.get("oom") else fmt(tok, ".0f"),
                      fmt(_ratio(tok, ref and ref["tokens_per_s"])), fmt(r.get("median_s"), ".4g"),
                      fmt(m, ".0f", scale=1 / MiB),
                      fmt(_ratio(m, ref and max(ref["peak_extra_bytes"], 1)), ".3f"),
                      fmt(r.get("peak_total_bytes"), ".0f", scale=1 / MiB), *(f(r) for _, f in extra)])
    return md_table(header, "lrrlrrrrrr" + "l" * len(extra), lines)


def plots(data: dict, out: Path) -> list[Path]:
    rows = _entries(data, "op")
    if not rows:
        return []
    try:
        import matplotlib
    except ImportError:
        print("benchmarks.tools.report: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    first = {}
    for r in sorted(rows, key=lambda r: (r["dtype"], r["H"], r["N"])):
        first.setdefault(r["family"], r)
    fams = list(first)
    written = []
    metrics = (("median_s", "forward + backward, median s", "time_vs_vocab.png", 1),
               ("peak_extra_bytes", "peak extra memory, MiB", "memory_vs_vocab.png", MiB))
    for metric, label, fname, scale in metrics:
        fig, axes = plt.subplots(1, len(fams), figsize=(5.5 * len(fams), 4.2), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            impls = sorted({r["impl"] for r in rows if r["family"] == fam},
                           key=lambda i: (i != "reference", i))
            for impl in impls:
                pts = sorted((r["V"], r[metric] / scale) for r in rows
                             if r["family"] == fam and r["impl"] == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            vs = sorted({r["V"] for r in rows if r["family"] == fam})
            ax.set_xticks(vs, [f"{v / 1000:g}k" for v in vs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(label)
            ax.set_title(fam, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        dev = (data.get("prada") or {}).get("device", "")
        fig.suptitle(f"prada_loss, {label.split(',')[0]} ({dev})")
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def versions_text(v: dict) -> str:
    """The versions of prada_fast.envinfo.versions() in a line (those installed)."""
    return ", ".join(f"{k} {x}" for k, x in v.items() if x)


def header(data: dict) -> list[str]:
    pr = data.get("prada") or {}
    v = pr.get("versions") or {}
    m = pr.get("machine") or {}
    mach = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m.get('cpu_count')} cores, {m.get('mem_gib')} GiB"
    commit = (data.get("commit_info") or {}).get("id", "")
    ceil = next((r.get("ceiling_tflops") for r in _entries(data, "op") if r.get("ceiling_tflops")), None)
    dt = "bf16" if pr.get("device", "cpu").startswith("cuda") else "fp32"
    ceil_line = [f"- matrix-product ceiling measured in the run: {ceil * 1e3:.0f} GFLOP/s ({dt})"]
    ceil_line = ceil_line if ceil else []
    return [f"- date: {pr.get('date', data.get('datetime', ''))}",
            f"- machine: {mach} ({m.get('torch_threads')} torch threads)",
            f"- versions: {versions_text(v)}",
            f"- commit: {commit[:12]}",
            f"- command: `{pr.get('command', '')}`",
            f"- suite wall time: {pr.get('wall_s', '?')} s", *ceil_line]


def tables(data: dict) -> tuple[str, str]:
    """The op table and the training-step table of a benchmark JSON ("" where it has none)."""
    return (op_table(op_rows(data), case_header="case (N x H x V, H_t)"),
            train_table(_entries(data, "train_step")))


def results_section(data: dict) -> str:
    pr = data.get("prada") or {}
    dev = pr.get("device", "cpu")
    parts = [f"<!-- results:{dev} -->", *header(data), ""]
    ot, tt = tables(data)
    if ot:
        parts += ["Op: forward + backward of `prada_loss` (fresh process per case; peak memory above the "
                  "inputs; parity = max relative error against the float64 oracle):", "", ot, ""]
    if tt:
        parts += ["Training step (student + teacher, DeepSpeed ZeRO-3, one process):", "", tt, ""]
    parts.append(f"<!-- /results:{dev} -->")
    return "\n".join(parts)


def update_results(results_md: Path, section: str) -> None:
    dev = re.match(r"<!-- results:(\S+) -->", section).group(1)
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    pat = re.compile(rf"<!-- results:{re.escape(dev)} -->.*?<!-- /results:{re.escape(dev)} -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.write_text(text)


def write_report(json_path, out=None, results_md=None) -> list[Path]:
    data = _load(json_path)
    out = Path(out) if out else Path(json_path).parent
    out.mkdir(parents=True, exist_ok=True)
    ot, tt = tables(data)
    md = ["# prada_fast benchmarks", "", *header(data), ""]
    if ot:
        md += ["## Op: forward + backward", "", ot, ""]
    if tt:
        md += ["## Training step", "", tt, ""]
    (out / "table.md").write_text("\n".join(md))
    section = results_section(data)
    (out / "results_section.md").write_text(section + "\n")
    written = [out / "table.md", out / "results_section.md", *plots(data, out)]
    if results_md:
        update_results(Path(results_md), section)
        written.append(Path(results_md))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="the --benchmark-json output of `pytest benchmarks/`")
    p.add_argument("--out", help="output folder (default: the JSON's folder)")
    p.add_argument("--update-results", metavar="RESULTS_MD",
                   help="replace this device's block in RESULTS.md with the new figures")
    a = p.parse_args(argv)
    for path in write_report(a.json, a.out, a.update_results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
