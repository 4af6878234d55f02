"""The paper's Figure 4: CA, ASR and TA against lam and against gamma, BatchNorm averages kept and recomputed.

One backdoored model of the bench's recipe (its cache, its held-out evaluation images, its budget pool), the
trigger and target known, and one fixed layer group for every point (default: the entry of the last stage,
the group whose edit feeds BatchNorms, so that ``bn_stats`` matters; a classifier-only edit feeds none).
Fixed layers keep the sweep a sweep of lam and gamma alone: the cross-validation would change layers as lam
moves. lam is swept at gamma 1; gamma at the smallest lam of the engine's grid. Every point is one
:func:`agme_hub.engine.clean` call with ``layers``, ``lam`` and ``gamma`` given, measured on the held-out
images: this is an ablation, not a choice (nothing here chooses the engine's defaults).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...constants import DEFAULT_GAMMA, cache_dir
from ...data import Preprocessor, balanced_indices, load_images, split_edit_eval
from ...engine.clean import clean, evaluate, inspect_layers
from ...engine.metrics import natural_confusion
from ...errors import UsageError
from ...options import MethodOptions
from ...report import write_text_atomic
from .grid import BenchConfig, arch_spec
from .models import backdoored_model, resolve_trigger
from .outputs import environment, json_default
from .tables import markdown_table, pct

__all__ = ["AblationConfig", "run_ablation", "ABLATION_COLUMNS"]

ABLATION_COLUMNS = ["sweep", "bn_stats", "lam", "gamma", "layers", "ca", "asr", "ta", "ta_no_repair", "seconds"]
_METRICS = (("ca", "clean accuracy (%)"), ("asr", "attack success rate (%)"), ("ta", "target-class accuracy (%)"))


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: the model of (dataset, arch, trigger, seed) of the bench, a budget, the lam and gamma grids."""

    bench: BenchConfig = field(default_factory=BenchConfig.quick)  # recipe, target, evaluation images, cache
    dataset: str = "fashion-mnist"
    arch: str = "resnet10t"
    trigger: str = "badnets-white-br"
    seed: int = 0
    per_class: int = 10
    lams: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    gammas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    lam_at: float = 0.01  # lam of the gamma sweep (the committed figure's; the grid's lower edge when it was run)
    gamma_at: float = DEFAULT_GAMMA  # gamma of the lam sweep
    group: str = "entry"  # candidate group edited at every point (engine.inspect_layers); falls back to classifier
    bn_stats: tuple[str, ...] = ("keep", "recompute")

    def __post_init__(self) -> None:
        for lam in (*self.lams, self.lam_at):
            MethodOptions(lam=lam)  # a bad value is a UsageError naming the knob
        for gamma in (*self.gammas, self.gamma_at):
            MethodOptions(gamma=gamma)
        for mode in self.bn_stats:
            MethodOptions(bn_stats=mode)
        arch_spec(self.arch)  # an unknown architecture fails here, before any work
        if self.per_class < 1:
            raise UsageError("the ablation needs at least 1 image per class")


def _points(config: AblationConfig) -> list[tuple[str, float, float]]:
    return ([("lam", lam, config.gamma_at) for lam in config.lams]
            + [("gamma", config.lam_at, gamma) for gamma in config.gammas])


def run_ablation(config: AblationConfig, out_dir: str | os.PathLike[str], *, command: str | None = None,
                 say: Any = None) -> list[dict[str, Any]]:
    """Sweep lam and gamma with each ``bn_stats``; write ablation.csv, ablation.json, ablation.md, ablation.png."""
    say = say or (lambda line: None)
    bench = config.bench
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        # The bench's own split: fixed held-out images, the budget drawn from the rest (cells.run_bench).
        test = load_images(config.dataset, split="test")
        eval_idx = balanced_indices(test.labels, bench.eval_per_class, seed=10_007)
        evalset = test.subset(eval_idx, f"{config.dataset}:test (held out)")
        pool = test.subset(np.setdiff1d(np.arange(len(test)), eval_idx), f"{config.dataset}:test (budget pool)")
        edit, _ = split_edit_eval(pool, config.per_class, seed=config.seed)
        spec = resolve_trigger(config.trigger, test.image_shape, out / "triggers")
        cache = Path(bench.model_cache) if bench.model_cache else cache_dir() / "bench"
        say(f"{config.dataset} {config.arch} {config.trigger} seed {config.seed}: training or loading the model")
        model, _ = backdoored_model(cache, config.dataset, config.arch, config.trigger, spec, config.seed, bench,
                                    test.image_shape)
        target = bench.target
        before = evaluate(model, evalset, spec, target)
        groups = inspect_layers(model).groups
        layers = groups.get(config.group) or groups["classifier"]
        confusion = natural_confusion(model, evalset, Preprocessor.from_model(model), target)
        rows: list[dict[str, Any]] = []
        for mode in config.bn_stats:
            for sweep, lam, gamma in _points(config):
                same = next((r for r in rows if (r["bn_stats"], r["lam"], r["gamma"]) == (mode, lam, gamma)), None)
                if same is not None:  # the point where the two sweeps cross: measured once
                    rows.append({**same, "sweep": sweep})
                    continue
                start = time.perf_counter()
                options = dict(layers=tuple(layers), lam=lam, gamma=gamma, bn_stats=mode, seed=config.seed)
                result = clean(model, edit, trigger=spec, target=target, **options)
                seconds = time.perf_counter() - start
                after = evaluate(result.model, evalset, spec, target)
                unrepaired = result.unrepaired_model
                if unrepaired is None:  # recompute: the engine reports no unrepaired twin; edit once more without
                    unrepaired = clean(model, edit, trigger=spec, target=target, repair=False, **options).model
                ta_no_repair = evaluate(unrepaired, evalset, spec, target).target_accuracy
                row = {"sweep": sweep, "bn_stats": mode, "lam": lam, "gamma": gamma, "layers": ",".join(layers),
                       "ca": after.clean_accuracy, "asr": after.attack_success_rate, "ta": after.target_accuracy,
                       "ta_no_repair": ta_no_repair, "seconds": seconds}
                say(f"  {mode:<9} {sweep:<5} lam {lam:<6g} gamma {gamma:<5g} CA {pct(row['ca'])}  "
                    f"ASR {pct(row['asr'])}  TA {pct(row['ta'])} (no repair {pct(ta_no_repair)})")
                rows.append(row)
    finally:
        torch.set_num_threads(threads_before)
    record = {"command": command, "config": asdict(config), "elapsed_seconds": time.perf_counter() - started,
              "environment": environment(bench), "trigger_spec": spec, "target": target, "layers": layers,
              "group": config.group if config.group in groups else "classifier",
              "n_edit": len(edit), "n_eval": len(evalset), "natural_confusion": confusion,
              "backdoored": {"ca": before.clean_accuracy, "asr": before.attack_success_rate,
                             "ta": before.target_accuracy}, "rows": rows}
    _write(out, record)
    return rows


def _write(out: Path, record: dict[str, Any]) -> None:
    """ablation.json, ablation.csv, ablation.md and ablation.png; each written whole, then moved into place."""
    write_text_atomic(out / "ablation.json", json.dumps(record, indent=1, default=json_default) + "\n")
    tmp = out / ".ablation.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ABLATION_COLUMNS)
        writer.writeheader()
        for row in record["rows"]:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, out / "ablation.csv")
    _plot(record, out / "ablation.png")
    write_text_atomic(out / "ablation.md", _markdown(record))


def _markdown(record: dict[str, Any]) -> str:
    config, b = record["config"], record["backdoored"]
    lines = ["# agme ablation: lam and gamma, BatchNorm averages kept and recomputed", ""]
    if record["command"]:
        lines += [f"Command: `{record['command']}`", ""]
    lines += [
        f"Model: the bench's {config['arch']} on {config['dataset']}, trigger `{config['trigger']}` "
        f"(`{record['trigger_spec']}`), target {record['target']}, seed {config['seed']} "
        f"({config['bench']['n_train']} training images per class, poison rate {config['bench']['poison_rate']:g}). "
        f"Backdoored: CA {pct(b['ca'])}, ASR {pct(b['asr'])}, TA {pct(b['ta'])}; natural confusion (clean "
        f"non-target held-out images sent to the target) {pct(record['natural_confusion'])}.", "",
        f"Edit: trigger and target known, {record['n_edit']} clean images ({config['per_class']} per class), "
        f"fixed layers at every point: group `{record['group']}` = `{', '.join(record['layers'])}` (no "
        f"cross-validation: it would change the layers as lam moves). lam swept at gamma {config['gamma_at']:g}; "
        f"gamma swept at lam {config['lam_at']:g}. Repair on (w_t as the default); `TA no repair` is the same "
        f"edit without it. Metrics on {record['n_eval']} held-out images (%). Nothing here chooses a default: "
        "the engine chooses lam by cross-validation on D.", ""]
    for sweep in ("lam", "gamma"):
        body = [[r["bn_stats"], f"{r[sweep]:g}", pct(r["ca"]), pct(r["asr"]), pct(r["ta"]), pct(r["ta_no_repair"])]
                for r in record["rows"] if r["sweep"] == sweep]
        lines += [f"## Against {sweep}", "", *markdown_table(["BatchNorm averages", sweep, "CA", "ASR", "TA",
                                                              "TA no repair"], body), ""]
    lines += ["![CA, ASR and TA against lam and gamma](ablation.png)", ""]
    return "\n".join(lines)


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib  # an optional extra (agme[bench]): imported only when an ablation is plotted

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows, b = record["rows"], record["backdoored"]
    fig, axes = plt.subplots(len(_METRICS), 2, figsize=(8.4, 8.0), squeeze=False, sharex="col")
    for col, sweep in enumerate(("lam", "gamma")):
        for row_index, (metric, title) in enumerate(_METRICS):
            ax = axes[row_index][col]
            for mode, colour in (("keep", "C0"), ("recompute", "C1")):
                points = [r for r in rows if r["sweep"] == sweep and r["bn_stats"] == mode]
                if points:
                    ax.plot([r[sweep] for r in points], [100 * r[metric] for r in points], linestyle="-",
                            marker="o", color=colour, label=f"BN averages {mode}")
                    if metric == "ta":
                        ax.plot([r[sweep] for r in points], [100 * r["ta_no_repair"] for r in points], linestyle="--",
                                marker=".", color=colour, alpha=0.7, label=f"{mode}, no repair")
            ax.axhline(100 * b[metric], color="grey", linestyle=":", label="backdoored")
            if metric == "asr":
                ax.axhline(100 * record["natural_confusion"], color="C2", linestyle=":", label="natural confusion")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(title)
            if row_index == len(_METRICS) - 1:
                ax.set_xlabel(sweep)
            if col == 0:
                ax.legend(fontsize=7)
    config = record["config"]
    fig.suptitle(f"{config['arch']}, {config['trigger']}, target {record['target']}, {config['per_class']} per class; "
                 f"layers {', '.join(record['layers'])}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
