"""The files of a grid: runs.csv, runs.json, table.md and the plots, from the rows of a run (or of an
unfinished one, ``report_partial``)."""

from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .grid import DEFENCES, BenchConfig
from .markdown import table_markdown
from .plots import plot
from .tables import headline

__all__ = ["CSV_COLUMNS", "write_outputs", "report_partial", "backdoor_from_row", "json_default"]

CSV_COLUMNS = [
    "dataset", "arch", "timm_arch", "family", "trigger", "seed", "per_class", "n_edit", "n_eval", "target",
    "defence", "knowledge", "repair", "status", "reason", "backdoor_ok", "backdoor_ca", "backdoor_asr", "backdoor_ta",
    "backdoor_ra", "backdoor_confusion", "ca", "asr", "ta", "ra", "der", "seconds", "peak_rss_mb", "memory_method",
    "floor_seconds", "floor_images", "agme_edit_seconds", "agme_capture_seconds", "agme_solve_seconds",
    "agme_selection_seconds", "agme_inversion_seconds", "edit_over_floor", "total_over_floor", "time_vs_agme_bdk", "time_vs_agme_nobdk",
    "layers", "lam", "train_seconds", "trigger_spec", "hparams",
]


def write_outputs(rows: list[dict[str, Any]], out_dir: str | os.PathLike[str], *, config: BenchConfig | None = None,
                  backdoors: list[dict[str, Any]] | None = None, command: str | None = None,
                  elapsed: float | None = None, reused: int = 0) -> dict[str, Path]:
    """Write runs.csv, runs.json, table.md and the PNG plots; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backdoors = backdoors or []
    paths = {"csv": out / "runs.csv", "json": out / "runs.json", "table": out / "table.md"}
    env = environment(config) if config else None
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in CSV_COLUMNS}
            flat["hparams"] = json.dumps(row.get("hparams"), default=json_default, sort_keys=True) if row.get("hparams") else ""
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items()})
    record = {"command": command, "config": asdict(config) if config else None, "elapsed_seconds": elapsed,
              "cells_reused_from_earlier_run": reused,
              "environment": env, "defences": {k: {"label": v[0], "knowledge": v[1],
              "repair": v[2]} for k, v in DEFENCES.items()}, "backdoors": backdoors,
              "headline": headline(rows), "rows": rows}
    paths["json"].write_text(json.dumps(record, indent=1, default=json_default) + "\n")
    paths.update(plot(rows, out))
    paths["table"].write_text(table_markdown(rows, config=config, backdoors=backdoors, command=command,
                                             elapsed=elapsed, reused=reused, env=env or {}))
    return paths


def report_partial(out_dir: str | os.PathLike[str], *, command: str | None = None) -> dict[str, Path]:
    """Write the table and plots from the rows an unfinished run left in ``out_dir/runs.partial.jsonl``."""
    out = Path(out_dir)
    rows = [json.loads(line) for line in (out / "runs.partial.jsonl").read_text().splitlines() if line.strip()]
    backdoors = list({(r["dataset"], r["arch"], r["trigger"], r["seed"]): backdoor_from_row(r) for r in rows}.values())
    return write_outputs(rows, out, backdoors=backdoors, command=command)


def backdoor_from_row(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("dataset", "arch", "timm_arch", "family", "trigger", "trigger_spec", "seed", "backdoor_ca", "backdoor_asr",
            "backdoor_ta", "backdoor_ra", "backdoor_confusion", "backdoor_ok", "train_seconds", "n_train_per_class",
            "poison_rate")
    return {k: row.get(k) for k in keys}


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def environment(config: BenchConfig) -> dict[str, Any]:
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "machine": platform.machine(), "processor": platform.processor() or "",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "platform": platform.platform()}
