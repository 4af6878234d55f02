"""The text of table.md: the headline, AGME against the best baseline, budgets, time, layers, models, cells."""

from __future__ import annotations

import statistics
from typing import Any

from .grid import DEFENCES, BenchConfig
from .tables import (CELL, aggregate, best_per_cell, headline_markdown, markdown_table, mean_std, num, pct, rank_key,
                     secs)

__all__ = ["table_markdown"]


def table_markdown(rows: list[dict[str, Any]], *, config: BenchConfig | None, backdoors: list[dict[str, Any]],
                   command: str | None, elapsed: float | None, reused: int, env: dict[str, Any]) -> str:
    """table.md for ``rows``; ``env`` is the machine the grid ran on (empty when unknown)."""
    lines = ["# agme bench results", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if config is not None:
        lines += [f"Grid `{config.name}`: datasets {', '.join(config.datasets)}; archs {', '.join(config.archs)}; "
                  f"triggers {', '.join(config.triggers)}; budgets {', '.join(map(str, config.budgets))} clean "
                  f"images per class; seeds {', '.join(map(str, config.seeds))}; target class {config.target}; "
                  f"poison rate {config.poison_rate:g}; {config.n_train} training images per class; "
                  f"{config.eval_per_class} held-out evaluation images per class; torch threads "
                  f"{config.threads or 'default'}.", ""]
    if elapsed is not None:
        what = (f"this invocation, which reused {reused} finished cell(s) from an earlier one in the same folder"
                if reused else "the whole run, training included")
        lines += [f"Wall time of {what}: {elapsed / 60:.1f} min on {env.get('cpu_count', '?')} CPU(s) "
                  f"({env.get('platform', '')}; torch {env.get('torch', '')}, timm {env.get('timm', '')}).", ""]
    lines += [
        "Knowledge: `agme-bdk*` get the true trigger and the target; `agme-nobdk*` and `nc` get the target only "
        "(each reconstructs a trigger); `ft`, `fp`, `clp`, `ftsam` get neither. All defences get the same clean "
        "images and the same backdoored model. Hyperparameters: AGME by cross-validation on its budget, baselines "
        "at their published defaults (recorded per run in runs.json); no test ASR chooses anything. ASR is always "
        "measured with the real trigger, on held-out images whose true class is not the target. "
        "DER = (max(0, ΔASR) − max(0, ΔCA) + 1) / 2 against the backdoored model. Seconds: wall time of the "
        "defence alone; peak MiB: resident memory the defence added at its peak (see `agme_hub/bench.py`).", "",
        "## Headline (all cells whose backdoor took; means over cells)", "",
        *headline_markdown(rows), "",
        "`best DER`: cells where this defence had the highest mean DER (ties: higher CA); `best DER w/o trigger`: "
        "the same among defences not given the trigger.", "",
        "## AGME against the best baseline, cell by cell", "",
        *_win_loss_markdown(rows), "",
        "## AGME against the issues' bars (per arch and budget; cells whose backdoor took)", "",
        "A cell meets the forgetting bar when its ASR is at most the backdoored model's natural confusion (clean "
        "non-target held-out images it already sends to the target) + 2 pt. TA change: against the backdoored "
        "model.", "",
        *_bars_markdown(rows), "",
        "## By budget (mean over triggers and seeds)", "",
        *_per_budget_markdown(rows), "",
        "## Time: AGME's edit against the forward-pass floor", "",
        "Floor: plain forward passes over D and T(D) with the engine's augmented copies (the images the edit "
        "reads). Edit: the final capture + solve; total: the whole `agme_hub.clean` call, with cross-validated "
        "selection and (no-BDK) trigger inversion. Medians over triggers and seeds.", "",
        *_timing_markdown(rows), "",
        "## Layers and lam chosen by AGME's cross-validation (on the clean budget only)", "",
        *_layers_markdown(rows), "",
        "## Backdoored models (on the held-out evaluation images)", "",
        *_backdoor_markdown(backdoors), "",
        "## Every cell (mean ± std over seeds)", "",
        "★ best DER in the cell; † best DER among defences not given the trigger.", "",
        *_cell_markdown(rows), "",
        "Plots: `asr_vs_budget.png`, `ca_vs_budget.png`, `time_per_defence.png`, `agme_edit_vs_floor.png`.", "",
    ]
    return "\n".join(lines)


def _timing_markdown(rows: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r["defence"] in ("agme-bdk", "agme-nobdk"):
            groups.setdefault((r["dataset"], r["arch"], r["per_class"], r["defence"]), []).append(r)
    body = []
    for (dataset, arch, per_class, defence), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                               kv[0][2], kv[0][3])):
        def med(key: str) -> float | None:
            values = [m[key] for m in members if m.get(key) is not None]
            return statistics.median(values) if values else None

        body.append([dataset, arch, str(per_class), defence, str(int(med("floor_images") or 0)), secs(med("floor_seconds")),
                     secs(med("agme_edit_seconds")), secs(med("agme_solve_seconds")),
                     num(med("edit_over_floor")), secs(med("agme_selection_seconds")),
                     secs(med("agme_inversion_seconds")), secs(med("seconds")), num(med("total_over_floor"))])
    header = ["dataset", "arch", "img/class", "defence", "floor images", "floor s", "edit s (capture+solve)",
              "solve s", "edit / floor", "selection (CV) s", "inversion s", "total s", "total / floor"]
    return markdown_table(header, body)


def _bars_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Per arch, budget and AGME variant: mean CA / TA change, ASR against natural confusion, worst cells."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("backdoor_ok") and r["defence"].startswith("agme"):
            groups.setdefault((r["arch"], r["per_class"], r["defence"]), []).append(r)
    if len({arch for arch, _, _ in groups}) > 1:  # and over every arch
        for (_, per_class, defence), members in list(groups.items()):
            groups.setdefault(("(all)", per_class, defence), []).extend(members)
    order = list(DEFENCES)
    body = []
    for (arch, per_class, defence), members in sorted(groups.items(), key=lambda kv: (kv[0][0] == "(all)", kv[0][0],
                                                                                     kv[0][1], order.index(kv[0][2]))):
        ca = [r["ca"] - r["backdoor_ca"] for r in members]
        ta = [r["ta"] - r["backdoor_ta"] for r in members if r.get("ta") is not None]
        known = [r for r in members if r.get("backdoor_confusion") is not None]
        met = sum(r["asr"] <= r["backdoor_confusion"] + 0.02 for r in known)
        body.append([arch, str(per_class), f"`{defence}`", str(len(members)), f"{100 * statistics.mean(ca):+.1f}",
                     pct(statistics.mean(r["asr"] for r in members)),
                     pct(statistics.mean(r["backdoor_confusion"] for r in known)) if known else "-",
                     f"{met} of {len(known)}" if known else "-", pct(max(r["asr"] for r in members)),
                     f"{100 * statistics.mean(ta):+.1f}" if ta else "-", f"{100 * min(ta):+.1f}" if ta else "-"])
    return markdown_table(["arch", "img/class", "defence", "cells", "CA change (pt)", "mean ASR %",
                           "mean natural confusion %", "cells ASR <= natural + 2 pt", "max ASR %",
                           "TA change (pt)", "worst TA change (pt)"], body)


def _per_budget_markdown(rows: list[dict[str, Any]]) -> list[str]:
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"] and a["status"] == "ok"]
    budgets = sorted({a["per_class"] for a in aggregated})
    body = []
    for arch in dict.fromkeys(a["arch"] for a in aggregated):
        for name in DEFENCES:
            mine = [a for a in aggregated if a["arch"] == arch and a["defence"] == name]
            if not mine:
                continue
            cells = []
            for b in budgets:
                at = [a for a in mine if a["per_class"] == b]
                asr = mean_std([a["asr"] for a in at])[0]
                ca = mean_std([a["ca"] for a in at])[0]
                der = mean_std([a["der"] for a in at])[0]
                cells.append("-" if asr is None else f"{pct(asr)} / {pct(ca)} / {num(der)}")
            body.append([arch, f"`{name}`"] + cells)
    return markdown_table(["arch", "defence"] + [f"{b}/class: ASR / CA / DER" for b in budgets], body)


def _cell_markdown(rows: list[dict[str, Any]]) -> list[str]:
    aggregated = aggregate(rows)
    winners = best_per_cell([a for a in aggregated if a["backdoor_ok"]])
    winners_blind = best_per_cell([a for a in aggregated if a["backdoor_ok"]], exclude_knowledge=("trigger+target",))
    body = []
    not_learned_shown = set()
    for a in aggregated:
        key = tuple(a[k] for k in CELL)
        if not a["backdoor_ok"]:  # one line per cell, not one per defence
            if key not in not_learned_shown:
                not_learned_shown.add(key)
                body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), "(all)",
                             f"backdoor not learned: {(a['reason'] or '').replace('|', '/')[:90]}", "", "", "", "",
                             "", ""])
            continue
        name = f"`{a['defence']}`"
        marks = ("★" if winners.get(key) == a["defence"] else "") + ("†" if winners_blind.get(key) == a["defence"] else "")
        if marks:
            name = f"**{name}** {marks}"
        if a["status"] != "ok":
            what = "backdoor not learned" if not a["backdoor_ok"] else a["status"]
            detail = (a["reason"] or "").replace("|", "/")[:90]
            body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), name, f"{what}: {detail}", "", "",
                         "", "", "", ""])
            continue
        body.append([a["dataset"], a["arch"], a["trigger"], str(a["per_class"]), name, pct(a["ca"], a["ca_std"]),
                     pct(a["asr"], a["asr_std"]), pct(a["ta"], a["ta_std"]), pct(a["ra"], a["ra_std"]),
                     num(a["der"], a["der_std"]), secs(a["seconds"]), num(a["peak_rss_mb"], digits=0)])
    return markdown_table(["dataset", "arch", "trigger", "img/class", "defence", "CA %", "ASR %", "TA %", "RA %",
                            "DER", "s", "peak MiB"], body)


def _layers_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """How often cross-validation chose each layer group and lam, per arch and AGME variant."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for r in rows:
        if r.get("status") == "ok" and r["defence"].startswith("agme") and r.get("backdoor_ok"):
            key = (r["arch"], r["defence"], r.get("layers") or "-", f"{r['lam']:g}" if r.get("lam") is not None else "-")
            counts[key] = counts.get(key, 0) + 1
    body = [[arch, f"`{d}`", f"`{layers}`", lam, str(n)] for (arch, d, layers, lam), n in sorted(counts.items())]
    return markdown_table(["arch", "defence", "layers edited", "lam", "runs"], body)


def _backdoor_markdown(backdoors: list[dict[str, Any]]) -> list[str]:
    body = [[b["dataset"], b["arch"], b["trigger"], str(b["seed"]), pct(b["backdoor_ca"]), pct(b["backdoor_asr"]),
             pct(b["backdoor_ta"]), pct(b.get("backdoor_confusion")), "yes" if b["backdoor_ok"] else "**no**",
             secs(b.get("train_seconds"))] for b in backdoors]
    return markdown_table(["dataset", "arch", "trigger", "seed", "CA %", "ASR %", "TA %", "natural confusion %",
                           "backdoor took", "train s"], body)


def _win_loss_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Per cell: AGME's DER against the best baseline's (same knowledge or less), win or loss, no filtering."""
    aggregated = [a for a in aggregate(rows) if a["backdoor_ok"] and a["status"] == "ok"]
    cells: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for a in aggregated:
        cells.setdefault(tuple(a[k] for k in CELL), {})[a["defence"]] = a
    body = []
    tally = {"agme-bdk": [0, 0], "agme-nobdk": [0, 0]}
    ta_lower = {"agme-bdk": 0, "agme-nobdk": 0}
    for key, by in cells.items():
        baselines = {d: a for d, a in by.items() if not d.startswith("agme")}
        if not baselines:
            continue
        best_name = max(baselines, key=lambda d: rank_key(baselines[d]))
        best = baselines[best_name]
        line = [*map(str, key), f"`{best_name}` {num(best['der'])} (ASR {pct(best['asr'])}, CA {pct(best['ca'])}, "
                                f"TA {pct(best['ta'])})"]
        for agme in ("agme-bdk", "agme-nobdk"):
            a = by.get(agme)
            if a is None:
                line.append("-")
                continue
            win = rank_key(a) > rank_key(best)
            tally[agme][0 if win else 1] += 1
            if a["ta"] is not None and best["ta"] is not None and a["ta"] < best["ta"]:
                ta_lower[agme] += 1
            line.append(f"{'win' if win else 'loss'}: {num(a['der'])} (ASR {pct(a['asr'])}, CA {pct(a['ca'])}, "
                        f"TA {pct(a['ta'])})")
        body.append(line)
    lines = markdown_table(["dataset", "arch", "trigger", "img/class", "best baseline: DER", "agme-bdk", "agme-nobdk"],
                            body)
    summary = [f"`{k}` beats the best baseline on DER in {w} of {w + l} cells and loses in {l}; its target-class "
               f"accuracy (TA, which DER ignores) is below that baseline's in {ta_lower[k]} of the {w + l}."
               for k, (w, l) in tally.items() if w + l]
    return summary + [""] + lines
