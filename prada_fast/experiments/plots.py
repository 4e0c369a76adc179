"""PNG plots of the comparison (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit("the comparison report needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[bench]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


MARKERS = "os^DvP*X"


def plot_pca(panels: list[dict], path: str | Path, title: str) -> Path:
    """Side-by-side scatter plots of 2-D PCA coordinates coloured by domain.

    Each panel: {"title", "coords" (n x 2), "labels" (n,), "domains", "roles", "ratio" (2,)}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, p in zip(axes[0], panels):
        coords, labels = p["coords"], p["labels"]
        for i, d in enumerate(p["domains"]):
            sel = labels == i
            if not bool(sel.any()):
                continue
            target = p["roles"].get(d) == "target"
            ax.scatter(coords[sel, 0], coords[sel, 1], s=18, alpha=0.75,
                       marker=MARKERS[i % len(MARKERS)],
                       facecolors="none" if target else cmap(i % 10), edgecolors=cmap(i % 10),
                       label=f"{d} (target)" if target else d)
        r = p["ratio"]
        ax.set_xlabel(f"PC1 ({100 * float(r[0]):.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * float(r[1]):.0f}% of variance)" if len(r) > 1 else "PC2")
        ax.set_title(p["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_losses(curves: dict, path: str | Path, title: str, n_domains: int,
                keys=("ce", "kd", "dom", "dom_acc")) -> Path:
    """Loss curves, mean over seeds with a +-1 std band, one line per variant, one shared
    legend. curves: {variant label: mean_curves(...) output}; a variant without a key (no
    domain loss: no dom, dom_acc) is left out of that panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.9), squeeze=False)
    cmap = plt.get_cmap("tab10")
    names = {"ce": "hard CE (task)", "kd": "KD to the teacher", "dom": "domain CE (L_dom)",
             "dom_acc": "domain head accuracy (train batch)"}
    handles = {}
    for ax, key in zip(axes[0], keys):
        for i, (label, c) in enumerate(curves.items()):
            if not c or key not in c:
                continue
            steps = c["step"]
            mean = [float("nan") if v is None else v for v in c[key]["mean"]]
            std = [0.0 if v is None else v for v in c[key]["std"]]
            (line,) = ax.plot(steps, mean, color=cmap(i), label=label, lw=1.6)
            handles[label] = line
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=cmap(i), alpha=0.18, lw=0)
        if key == "dom" and n_domains > 1:
            ref = ax.axhline(math.log(n_domains), color="gray", ls="--", lw=1)
            handles[f"chance: ln D = {math.log(n_domains):.2f}, 1/D = {1 / n_domains:.2f}"] = ref
        if key == "dom_acc" and n_domains > 1:
            ax.axhline(1 / n_domains, color="gray", ls="--", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_title(names.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
