"""no-BDK (target given, trigger unknown) before and after issue 12's surrogates, on the bench's models.

    python benchmarks/nobdk_study.py [--archs resnet10t,convnext] [--triggers badnets-white-br,blend,additive,sig]
        [--variants patch,patch+full] [--out benchmarks/results/nobdk_surrogates] [--train-only]

Models, D and the held-out images are the bench's (``agme_hub.lab.bench``, quick recipe): Fashion-MNIST, 300
training images per class, poison rate 0.1, target 0, seed 0; D = 10 clean test images per class drawn from the
bench's budget pool, held-out = its 100 fixed images per class. Variants: ``patch`` = the engine before issue 12
(one Neural Cleanse surrogate, ``surrogates=("patch",)``), ``patch+full`` = the default now (the cross-validation
chooses among {patch}, {full}, {patch, full}), ``full`` = the perturbation alone, ``bdk`` = the trigger given
(for reference). The held-out images only measure; nothing is chosen on them. One JSON line per (model,
variant) goes to ``OUT/rows.jsonl`` (rows already there are reused); ``OUT/table.md`` is rewritten each time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agme_hub.constants import cache_dir
from agme_hub.data import balanced_indices, load_images, split_edit_eval
from agme_hub.engine.clean import clean, evaluate
from agme_hub.engine.metrics import natural_confusion
from agme_hub.data import Preprocessor
from agme_hub.lab.bench.grid import BenchConfig
from agme_hub.lab.bench.models import backdoored_model, resolve_trigger

VARIANTS = {"patch": {"surrogates": ("patch",)}, "full": {"surrogates": ("full",)},
            "patch+full": {"surrogates": ("patch", "full")}, "bdk": {}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="resnet10t,convnext")
    parser.add_argument("--triggers", default="badnets-white-br,blend,additive,sig")
    parser.add_argument("--variants", default="patch,patch+full")
    parser.add_argument("--out", default="benchmarks/results/nobdk_surrogates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BenchConfig.quick()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    done = {(r["arch"], r["trigger"], r["variant"]) for r in rows}
    test = load_images("fashion-mnist", split="test")
    eval_idx = balanced_indices(test.labels, config.eval_per_class, seed=10_007)  # the bench's held-out images
    evalset = test.subset(eval_idx)
    pool = test.subset(np.setdiff1d(np.arange(len(test)), eval_idx))
    edit, _ = split_edit_eval(pool, 10, seed=0)
    cache = cache_dir() / "bench"
    for trigger_name in args.triggers.split(","):
        spec = resolve_trigger(trigger_name, test.image_shape, out / "triggers")
        for arch in args.archs.split(","):
            model, _ = backdoored_model(cache, "fashion-mnist", arch, trigger_name, spec, 0, config, test.image_shape)
            if args.train_only:
                print(arch, trigger_name, "ready", flush=True)
                continue
            before = evaluate(model, evalset, spec, config.target)
            natural = natural_confusion(model, evalset, Preprocessor.from_model(model), config.target)
            for variant in args.variants.split(","):
                if (arch, trigger_name, variant) in done:
                    continue
                start = time.perf_counter()
                result = clean(model, edit, trigger=spec if variant == "bdk" else None, target=config.target,
                               **VARIANTS[variant])
                seconds = time.perf_counter() - start
                after = evaluate(result.model, evalset, spec, config.target)
                sel = result.selection
                row = {"arch": arch, "trigger": trigger_name, "variant": variant, "natural": natural,
                       "before_ca": before.clean_accuracy, "before_asr": before.attack_success_rate,
                       "before_ta": before.target_accuracy, "ca": after.clean_accuracy,
                       "asr": after.attack_success_rate, "ta": after.target_accuracy,
                       "forget": sel.forget if sel else None, "layers": result.layers, "lam": result.lam,
                       "surrogates": {s.kind: {"success": s.success, "size": s.size}
                                      for s in getattr(result, "surrogates", ())},
                       "seconds": seconds, "inversion_seconds": result.timings.inversion}
                rows.append(row)
                with open(rows_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                write_table(rows, out / "table.md")
    write_table(rows, out / "table.md")


def write_table(rows: list[dict], path: Path) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| arch | trigger | natural confusion | before CA / ASR / TA | variant | CA / ASR / TA | CA drop | "
             "forgot | layers, lam |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['trigger']} | {pct(r['natural'])} | {pct(r['before_ca'])} / "
                     f"{pct(r['before_asr'])} / {pct(r['before_ta'])} | {r['variant']} | {pct(r['ca'])} / "
                     f"{pct(r['asr'])} / {pct(r['ta'])} | {100 * (r['before_ca'] - r['ca']):.1f} | {r['forget']} | "
                     f"{','.join(r['layers'])}, {r['lam']:g} |")
    for variant in sorted({r["variant"] for r in rows}):
        sub = [r for r in rows if r["variant"] == variant]
        lines.append("")
        lines.append(f"{variant}: {len(sub)} cells, mean ASR {pct(np.mean([r['asr'] for r in sub]))}% "
                     f"(mean natural confusion {pct(np.mean([r['natural'] for r in sub]))}%), max ASR "
                     f"{pct(max(r['asr'] for r in sub))}%, mean CA drop "
                     f"{100 * np.mean([r['before_ca'] - r['ca'] for r in sub]):.2f} pt, mean TA drop "
                     f"{100 * np.mean([r['before_ta'] - r['ta'] for r in sub]):.1f} pt")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
