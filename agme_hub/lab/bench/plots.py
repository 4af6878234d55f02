"""The PNG plots of a grid: ASR and CA against the budget, time per defence, AGME's edit against the floor."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .grid import DEFENCES

__all__ = ["plot"]

_STYLE = {"agme-bdk": ("C0", "-", "o"), "agme-bdk-norepair": ("C0", "--", "o"), "agme-nobdk": ("C1", "-", "s"),
          "agme-nobdk-norepair": ("C1", "--", "s"), "ft": ("C2", "-", "^"), "fp": ("C3", "-", "v"),
          "clp": ("C4", "-", "D"), "nc": ("C5", "-", "P"), "ftsam": ("C6", "-", "X")}


def plot(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """ASR and CA against images per class (one panel per arch), time per defence, AGME edit vs floor."""
    import matplotlib  # an optional extra (agme[bench]): imported only when a grid is plotted

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("backdoor_ok")]
    archs = list(dict.fromkeys(r["arch"] for r in rows)) or ["-"]
    budgets = sorted({r["per_class"] for r in rows}) or [1]
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in ok)]
    paths: dict[str, Path] = {}
    for metric, title in (("asr", "attack success rate (%)"), ("ca", "clean accuracy (%)")):
        fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False, sharey=True)
        for ax, arch in zip(axes[0], archs):
            for name in defences:
                xs, ys = [], []
                for b in budgets:
                    values = [r[metric] for r in ok if r["arch"] == arch and r["defence"] == name and r["per_class"] == b
                              and r.get(metric) is not None]
                    if values:
                        xs.append(b)
                        ys.append(100 * statistics.fmean(values))
                if xs:
                    colour, line, marker = _STYLE.get(name, ("k", "-", "."))
                    ax.plot(xs, ys, color=colour, linestyle=line, marker=marker, label=name)
            if metric == "ca":
                before = [r["backdoor_ca"] for r in ok if r["arch"] == arch and r.get("backdoor_ca") is not None]
                if before:
                    ax.axhline(100 * statistics.fmean(before), color="grey", linestyle=":", label="backdoored")
            ax.set_xscale("log")
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets])
            ax.set_title(arch)
            ax.set_xlabel("clean images per class")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            h, l = ax.get_legend_handles_labels()
            for hh, ll in zip(h, l):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.suptitle(f"{title} after the defence (mean over triggers, seeds, datasets)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_budget.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[f"{metric}_plot"] = path

    # Time per defence: median seconds at each budget, log scale, with the forward-pass floor.
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(defences) + 2), 3.8))
    width = 0.8 / max(1, len(budgets))
    for i, b in enumerate(budgets):
        heights = []
        for name in defences:
            values = [r["seconds"] for r in ok if r["defence"] == name and r["per_class"] == b]
            heights.append(statistics.median(values) if values else 0.0)
        ax.bar(np.arange(len(defences)) + (i - (len(budgets) - 1) / 2) * width, heights, width, label=f"{b}/class")
        floors = [r["floor_seconds"] for r in ok if r["per_class"] == b and r.get("floor_seconds")]
        if floors:
            ax.axhline(statistics.median(floors), color=f"C{i}", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(defences)))
    ax.set_xticklabels(defences, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("wall seconds of the defence (median)")
    ax.set_title("time per defence; dotted: forward-pass floor of the edit at that budget", fontsize=10)
    if defences:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out_dir / "time_per_defence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["time_plot"] = path

    # AGME's edit and whole run against the floor, per budget.
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, style in (("floor_seconds", "forward-pass floor", ":"), ("agme_edit_seconds", "edit (capture+solve)", "-"),
                              ("agme_selection_seconds", "selection (CV)", "--"), ("seconds", "agme-bdk total", "-.")):
        xs, ys = [], []
        for b in budgets:
            values = [r[key] for r in ok if r["defence"] == "agme-bdk" and r["per_class"] == b and r.get(key) is not None]
            if values:
                xs.append(b)
                ys.append(statistics.median(values))
        if xs:
            ax.plot(xs, ys, linestyle=style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("clean images per class")
    ax.set_ylabel("seconds (median over cells)")
    ax.set_title("AGME (trigger known) against its forward-pass floor", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "agme_edit_vs_floor.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths["floor_plot"] = path
    return paths
