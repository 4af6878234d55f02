"""The numbers of a finished grid: rows aggregated over seeds, the best defence per cell, the headline per
defence, and the headline as text (``headline_rows``), which both table.md and ``agme bench`` render."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from .grid import DEFENCES

__all__ = ["CELL", "METRICS", "aggregate", "best_per_cell", "headline", "headline_rows", "headline_markdown"]

CELL = ("dataset", "arch", "trigger", "per_class")
METRICS = ("ca", "asr", "ta", "ra", "der", "seconds", "peak_rss_mb")


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every (dataset, arch, trigger, budget, defence), in grid order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in CELL) + (row["defence"],), []).append(row)
    out = []
    for key, members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        statuses = sorted({r.get("status", "") for r in members})
        agg: dict[str, Any] = dict(zip(CELL + ("defence",), key))
        agg.update(knowledge=members[0].get("knowledge"), seeds=len(members), ok=len(ok),
                   status="ok" if ok else (statuses[0] if statuses else ""),
                   reason=next((r.get("reason") for r in members if r.get("reason")), ""),
                   backdoor_ok=all(r.get("backdoor_ok", True) for r in members),
                   backdoor_asr=mean_std([r.get("backdoor_asr") for r in members])[0],
                   backdoor_ca=mean_std([r.get("backdoor_ca") for r in members])[0],
                   backdoor_ta=mean_std([r.get("backdoor_ta") for r in members])[0])
        for metric in METRICS:
            agg[metric], agg[f"{metric}_std"] = mean_std([r.get(metric) for r in ok])
        out.append(agg)
    return out


def rank_key(agg: dict[str, Any]) -> tuple[float, float]:
    return (agg["der"] if agg["der"] is not None else -1.0, agg["ca"] if agg["ca"] is not None else -1.0)


def best_per_cell(aggregated: Iterable[dict[str, Any]], *, exclude_knowledge: tuple[str, ...] = ()
                  ) -> dict[tuple[Any, ...], str]:
    """The defence with the highest mean DER (then CA) in each cell; ``exclude_knowledge`` drops some defences."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for agg in aggregated:
        if agg["status"] != "ok" or agg["der"] is None or agg["knowledge"] in exclude_knowledge:
            continue
        key = tuple(agg[k] for k in CELL)
        if key not in best or rank_key(agg) > rank_key(best[key]):
            best[key] = agg
    return {k: v["defence"] for k, v in best.items()}


def pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def num(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per defence, over every cell whose backdoor took: means, wins, and time against AGME."""
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"]]
    winners = best_per_cell(aggregated)
    winners_blind = best_per_cell(aggregated, exclude_knowledge=("trigger+target",))
    cells = {tuple(a[k] for k in CELL) for a in aggregated}
    ok_rows = [r for r in rows if r.get("status") == "ok" and r.get("backdoor_ok")]
    order = [d for d in DEFENCES if any(a["defence"] == d for a in aggregated)]
    out = []
    for name in order:
        mine = [a for a in aggregated if a["defence"] == name]
        ok = [a for a in mine if a["status"] == "ok"]
        raw = [r for r in ok_rows if r["defence"] == name]
        ratios = [r["time_vs_agme_bdk"] for r in raw if r.get("time_vs_agme_bdk") is not None]
        ratios_nobdk = [r["time_vs_agme_nobdk"] for r in raw if r.get("time_vs_agme_nobdk") is not None]
        out.append({
            "defence": name, "label": DEFENCES[name][0], "knowledge": DEFENCES[name][1], "cells": len(mine),
            "applicable": len(ok),
            "ca_change": mean_std([a["ca"] - a["backdoor_ca"] for a in ok if a["backdoor_ca"] is not None])[0],
            "ta_change": mean_std([a["ta"] - a["backdoor_ta"] for a in ok
                                    if a["ta"] is not None and a["backdoor_ta"] is not None])[0],
            "asr": mean_std([a["asr"] for a in ok])[0], "ta": mean_std([a["ta"] for a in ok])[0],
            "ra": mean_std([a["ra"] for a in ok])[0], "der": mean_std([a["der"] for a in ok])[0],
            "asr_below_10": sum(1 for a in ok if a["asr"] is not None and a["asr"] < 0.10),
            "wins": sum(1 for k in cells if winners.get(k) == name),
            "wins_without_trigger": sum(1 for k in cells if winners_blind.get(k) == name),
            "median_seconds": statistics.median([r["seconds"] for r in raw]) if raw else None,
            "median_peak_mb": statistics.median([r["peak_rss_mb"] for r in raw if r.get("peak_rss_mb") is not None])
            if any(r.get("peak_rss_mb") is not None for r in raw) else None,
            "time_vs_agme_bdk": statistics.median(ratios) if ratios else None,
            "time_vs_agme_nobdk": statistics.median(ratios_nobdk) if ratios_nobdk else None,
        })
    return out


HEADLINE_HEADER = ("defence", "knows", "cells run", "CA change (pt)", "ASR %", "TA change (pt)", "RA %", "DER",
                   "cells ASR<10%", "best DER", "best DER w/o trigger", "median s", "median peak MiB",
                   "time / agme-bdk", "time / agme-nobdk")


def headline_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The headline as text: its header and, per defence, the formatted cells (plain text, no markup)."""
    body = []
    for h in headline(rows):
        body.append([h["defence"], h["knowledge"], f"{h['applicable']}/{h['cells']}",
                     f"{100 * h['ca_change']:+.1f}" if h["ca_change"] is not None else "-",
                     pct(h["asr"]), f"{100 * h['ta_change']:+.1f}" if h["ta_change"] is not None else "-",
                     pct(h["ra"]), num(h["der"]),
                     f"{h['asr_below_10']}", f"{h['wins']}", f"{h['wins_without_trigger']}",
                     secs(h["median_seconds"]), num(h["median_peak_mb"], digits=0),
                     num(h["time_vs_agme_bdk"]), num(h["time_vs_agme_nobdk"])])
    return list(HEADLINE_HEADER), body


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def headline_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The compact table the README shows."""
    header, body = headline_rows(rows)
    return markdown_table(header, [[f"`{cells[0]}`", *cells[1:]] for cells in body])
