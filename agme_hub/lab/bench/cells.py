"""The cells of the grid: one cell (every defence on the same backdoored model and the same clean images,
measured), and the run that walks every cell, resumable from the rows an interrupted run left."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...constants import cache_dir
from ...data import ImageSet, Preprocessor, balanced_indices, load_images, split_edit_eval
from ...engine.clean import clean, evaluate
from ...engine.metrics import Metrics, defense_effectiveness_rating, natural_confusion
from ...options import MethodOptions
from ...triggers import parse_trigger
from ..baselines import run_baseline
from .grid import DEFENCES, BenchConfig, arch_spec
from .measure import PeakMemory, forward_floor
from .models import backdoored_model, resolve_trigger
from .outputs import backdoor_from_row, json_default, write_outputs

__all__ = ["run_bench"]


# ---------------------------------------------------------------------------------------------- one cell
def _metrics_row(prefix: str, m: Metrics | None) -> dict[str, float | None]:
    keys = ("clean_accuracy", "attack_success_rate", "target_accuracy", "robust_accuracy")
    short = ("ca", "asr", "ta", "ra")
    return {f"{prefix}{s}": (None if m is None else getattr(m, k)) for s, k in zip(short, keys)}


def _run_defence(name: str, model: torch.nn.Module, edit: ImageSet, trigger_spec: str, target: int, seed: int,
                 config: BenchConfig) -> dict[str, Any]:
    """Run one defence on ``model`` (never modified) with the budget ``edit``; time and memory it."""
    out: dict[str, Any] = {}
    if name.startswith("agme"):
        _, knowledge, repair = DEFENCES[name]
        method = MethodOptions(repair=bool(repair), seed=seed, **config.agme_options)
        given = trigger_spec if knowledge == "trigger+target" else None
        with PeakMemory() as mem:
            start = time.perf_counter()
            result = clean(model, edit, trigger=given, target=target, method=method, device=config.device,
                           batch_size=config.batch_size)
            seconds = time.perf_counter() - start
        t = result.timings
        out.update(defended=result.model, applicable=True, reason="", seconds=seconds,
                   agme_capture_seconds=t.capture, agme_solve_seconds=t.solve, agme_edit_seconds=t.capture + t.solve,
                   agme_selection_seconds=t.selection, agme_inversion_seconds=t.inversion,
                   layers=",".join(result.layers), lam=result.lam,
                   hparams={"layers": result.layers, "lam": result.lam, "gamma": result.gamma,
                            "target_weight": result.target_weight, "augment_copies": result.augment_copies,
                            "bn_stats": result.bn_stats, "mode": result.mode, "trigger_used": result.trigger.spec,
                            "chosen_by": result.selection.describe() if result.selection is not None
                            else "given (lam and layers passed)", **config.agme_options})
    else:
        preprocess = Preprocessor.from_model(model)
        images = torch.cat([preprocess(edit.images[i:i + 512]) for i in range(0, len(edit), 512)])
        labels = torch.as_tensor(edit.labels, dtype=torch.long)
        overrides = dict(config.baseline_overrides.get(name, {}))
        if name == "nc":
            overrides.setdefault("target", target)  # the same knowledge as AGME without the trigger
        with PeakMemory() as mem:
            start = time.perf_counter()
            result = run_baseline(name, model, images, labels, seed=seed, **overrides)
            seconds = time.perf_counter() - start
        out.update(defended=result.model, applicable=result.applicable, reason=result.reason, seconds=seconds,
                   hparams=result.hparams)
    out.update(peak_rss_mb=mem.peak_mb, memory_method=mem.method)
    return out


def _cell_rows(model: torch.nn.Module, before: Metrics, edit: ImageSet, evalset: ImageSet, trigger_spec: str,
               base: dict[str, Any], config: BenchConfig, on_row: Callable[[dict[str, Any]], None] | None
               ) -> list[dict[str, Any]]:
    seed = base["seed"]
    floor_seconds, floor_images = forward_floor(model, edit, parse_trigger(trigger_spec), seed=seed,
                                                copies=config.agme_options.get("augment_copies"),
                                                device=config.device, batch_size=config.batch_size)
    rows = []
    for name in config.defences:
        label, knowledge, repair = DEFENCES[name]
        row: dict[str, Any] = {**base, "defence": name, "label": label, "knowledge": knowledge, "repair": repair,
                               "floor_seconds": floor_seconds, "floor_images": floor_images}
        try:
            done = _run_defence(name, model, edit, trigger_spec, config.target, seed, config)
        except Exception as err:  # recorded, never hidden: the grid goes on
            row.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            rows.append(row)
            continue
        defended = done.pop("defended")
        row.update(done)
        if done["applicable"] and defended is not None:
            after = evaluate(defended, evalset, trigger_spec, config.target)
            row.update(status="ok", **_metrics_row("", after), der=defense_effectiveness_rating(before, after))
        else:
            row.update(status="not applicable")
        if name.startswith("agme"):
            row["edit_over_floor"] = row["agme_edit_seconds"] / floor_seconds if floor_seconds > 0 else None
            row["total_over_floor"] = row["seconds"] / floor_seconds if floor_seconds > 0 else None
        rows.append(row)
        del defended
    ref = {r["defence"]: r.get("seconds") for r in rows if r.get("status") == "ok"}
    for row in rows:
        for key, agme in (("time_vs_agme_bdk", "agme-bdk"), ("time_vs_agme_nobdk", "agme-nobdk")):
            row[key] = (row["seconds"] / ref[agme] if row.get("seconds") is not None and ref.get(agme) else None)
        if on_row is not None:
            on_row(row)
    return rows


# ---------------------------------------------------------------------------------------------- the run
def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["dataset"], row["arch"], row["trigger"], row["seed"], row["per_class"])


def run_bench(config: BenchConfig, out_dir: str | os.PathLike[str], on_row: Callable[[dict[str, Any]], None] | None = None,
              *, command: str | None = None, resume: bool = True,
              say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the grid; write runs.csv, runs.json, table.md and plots into ``out_dir``; return every row.

    Rows are also appended to ``out_dir/runs.partial.jsonl`` as they come; with ``resume`` a cell (one
    dataset, arch, trigger, seed and budget) already complete there with the same grid settings is not run
    again, so an interrupted grid picks up where it stopped.
    """
    say = say or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    cache = Path(config.model_cache) if config.model_cache else cache_dir() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    partial = out / "runs.partial.jsonl"
    # Rows from an earlier run count when everything but the grid's axes matches: a grid extended with more
    # seeds, budgets, triggers or archs reuses the cells it already has.
    axes = {"name", "model_cache", "datasets", "archs", "triggers", "budgets", "seeds", "defences"}
    settings = {k: v for k, v in asdict(config).items() if k not in axes}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    done: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    if resume and partial.is_file():
        for line in partial.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("grid") == fingerprint:
                    done.setdefault(_cell_key(row), []).append(row)
        done = {k: v for k, v in done.items() if {r["defence"] for r in v} >= set(config.defences)}
    elif partial.exists():
        partial.unlink()

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    backdoors: list[dict[str, Any]] = []
    reused = 0

    def emit(row: dict[str, Any]) -> None:
        row["grid"] = fingerprint
        with open(partial, "a") as fh:
            fh.write(json.dumps(row, default=json_default) + "\n")
        if on_row is not None:
            on_row(row)

    try:
        for dataset in config.datasets:
            test = load_images(dataset, split="test")
            shape = test.image_shape
            eval_idx = balanced_indices(test.labels, config.eval_per_class, seed=10_007)
            evalset = test.subset(eval_idx, f"{dataset}:test (held out)")
            pool = test.subset(np.setdiff1d(np.arange(len(test)), eval_idx), f"{dataset}:test (budget pool)")
            for trigger_name in config.triggers:  # triggers outside archs: a stopped grid covers every arch
                trigger_spec = resolve_trigger(trigger_name, shape, out / "triggers")
                for arch in config.archs:
                    for seed in config.seeds:
                        keys = [(dataset, arch, trigger_name, seed, b) for b in config.budgets]
                        if all(k in done for k in keys):
                            for k in keys:
                                rows.extend(done[k])
                            reused += len(keys)
                            backdoors.append(backdoor_from_row(done[keys[0]][0]))
                            continue
                        say(f"{dataset} {arch} {trigger_name} seed {seed}: training or loading the backdoored model")
                        model, info = backdoored_model(cache, dataset, arch, trigger_name, trigger_spec, seed, config,
                                                       shape)
                        before = evaluate(model, evalset, trigger_spec, config.target)
                        asr = before.attack_success_rate or 0.0
                        confusion = natural_confusion(model, evalset, Preprocessor.from_model(model), config.target)
                        backdoor = {"dataset": dataset, "arch": arch, "timm_arch": arch_spec(arch).timm_name,
                                    "family": arch_spec(arch).family, "trigger": trigger_name,
                                    "trigger_spec": trigger_spec, "seed": seed, **_metrics_row("backdoor_", before),
                                    "backdoor_confusion": confusion,
                                    "backdoor_ok": asr >= config.min_asr, "train_seconds": info["train_seconds"],
                                    "n_train_per_class": config.n_train, "poison_rate": config.poison_rate}
                        backdoors.append(backdoor)
                        if asr < config.warn_asr:
                            say(f"  warning: the backdoor's ASR is {asr:.1%} (< {config.warn_asr:.0%})")
                        for per_class, key in zip(config.budgets, keys):
                            if key in done:
                                rows.extend(done[key])
                                reused += 1
                                continue
                            edit, _ = split_edit_eval(pool, per_class, seed=seed)
                            base = {**backdoor, "per_class": per_class, "n_edit": len(edit),
                                    "n_eval": len(evalset), "target": config.target}
                            if not backdoor["backdoor_ok"]:
                                for name in config.defences:
                                    label, knowledge, repair = DEFENCES[name]
                                    row = {**base, "defence": name, "label": label, "knowledge": knowledge,
                                           "repair": repair, "status": "backdoor not learned",
                                           **_metrics_row("", None), "der": None, "seconds": None,
                                           "reason": f"ASR {asr:.1%} < {config.min_asr:.0%}: not defended"}
                                    emit(row)
                                    rows.append(row)
                                continue
                            say(f"  {per_class} image(s) per class: {', '.join(config.defences)}")
                            rows.extend(_cell_rows(model, before, edit, evalset, trigger_spec, base, config, emit))
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - started
    write_outputs(rows, out, config=config, backdoors=backdoors, command=command, elapsed=elapsed, reused=reused)
    return rows
