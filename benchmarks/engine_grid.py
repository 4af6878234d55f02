"""The engine's measurement grid on full Fashion-MNIST: trigger x mode x images per class.

For each cell: CA, ASR, TA before and after on held-out test images, the seconds of capture, of the solve
and of the cross-validated choice, and the seconds of the forward passes the edit needs (the floor of any
activation-based method: D and T(D) with their augmented copies, once).

    python benchmarks/engine_grid.py --out benchmarks/results/engine_grid   # trains the models once (cached)

Models: the demo's small ResNet (resnet10t, channels 16-32-64-128), trained 2 epochs on all 60k
Fashion-MNIST training images with 10% poisoning, one per trigger; metrics on 500 test images per class
not used for editing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from agme_hub.lab.backdoor import BackdoorConfig, cached_backdoored
from agme_hub.lab.bench import forward_floor
from agme_hub.hub.checkpoint import load_model
from agme_hub.data import load_images, split_edit_eval
from agme_hub.engine.clean import clean, evaluate
from agme_hub.triggers import parse_trigger

TRIGGERS = {"badnets": "badnets-white-br", "blend": "blend:alpha=0.15"}


def backdoored_model(trigger: str, target: int) -> torch.nn.Module:
    config = dict(dataset="fashion-mnist", arch="resnet10t", trigger=trigger, target=target, poison_rate=0.1,
                  epochs=2, seed=0, n_train=None, n_test=None, model_args={"channels": [16, 32, 64, 128]})
    return load_model(cached_backdoored(BackdoorConfig(**config), prefix="grid-", key=config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_grid"))
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 5, 10, 50])
    parser.add_argument("--triggers", nargs="+", default=list(TRIGGERS))
    parser.add_argument("--modes", nargs="+", default=["bdk", "no-bdk"])
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--eval-per-class", type=int, default=500)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_images("fashion-mnist", split="test")
    rows = []
    for name in args.triggers:
        spec = TRIGGERS[name]
        model = backdoored_model(spec, args.target)
        for per_class in args.per_class:
            edit, held = split_edit_eval(test, per_class, seed=0, eval_per_class=args.eval_per_class)
            before = evaluate(model, held, spec, args.target)
            floor, _ = forward_floor(model, edit, parse_trigger(spec))  # the bench's: only the passes are timed
            for mode in args.modes:
                start = time.perf_counter()
                result = clean(model, edit, trigger=spec if mode == "bdk" else None, target=args.target, seed=0)
                seconds = time.perf_counter() - start
                after = evaluate(result.model, held, spec, args.target)
                row = {"trigger": name, "mode": mode, "per_class": per_class, "n_edit": len(edit),
                       "layers": ",".join(result.layers), "lam": result.lam,
                       "ca_before": before.clean_accuracy, "ca_after": after.clean_accuracy,
                       "asr_before": before.attack_success_rate, "asr_after": after.attack_success_rate,
                       "ta_before": before.target_accuracy, "ta_after": after.target_accuracy,
                       "seconds_total": seconds, "seconds_capture": result.timings.capture,
                       "seconds_solve": result.timings.solve,
                       "seconds_selection": result.timings.selection or 0.0,
                       "seconds_inversion": result.timings.inversion or 0.0, "seconds_forward_floor": floor}
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| trigger | mode | per class | layers | lam | CA before -> after | ASR before -> after | "
             "TA before -> after | capture s | solve s | CV s | forward floor s |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['trigger']} | {r['mode']} | {r['per_class']} | {r['layers']} | {r['lam']:g} | "
                     f"{100 * r['ca_before']:.1f} -> {100 * r['ca_after']:.1f} | "
                     f"{100 * r['asr_before']:.1f} -> {100 * r['asr_after']:.1f} | "
                     f"{100 * r['ta_before']:.1f} -> {100 * r['ta_after']:.1f} | {r['seconds_capture']:.2f} | "
                     f"{r['seconds_solve']:.3f} | {r['seconds_selection']:.1f} | {r['seconds_forward_floor']:.2f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
