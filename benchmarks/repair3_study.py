"""Repairs, third round: the classifier re-fit combined and tuned, on the demo and the bench (issue 13).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/repair3_study.py demo:entry:0.01 bench-resnet:entry:0.1 \
        bench-resnet10t-blend:entry:0.1 bench-convnext-badnets-white-br:entry:0.01

Each argument is MODEL:GROUP:LAM (models as in ``repair2_study.py``). The edit's statistics are captured once on
the original model (the entry group's layers read the same input, so one capture is exact) and every variant is
solved from them; each re-fit is a pass of engine/repair.py over D and its 9 augmented copies. Held-out numbers
compare variants at fixed strengths; they choose nothing. ``--second``: the second batch of variants.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import fixed_setting  # noqa: E402  (the same models and splits as the second round)

from agme_hub.data import load_images  # noqa: E402
from agme_hub.engine.edit import apply_edit, augmented_pairs, collect_stats  # noqa: E402
from agme_hub.engine.layers import editable_layer  # noqa: E402
from agme_hub.engine.metrics import measure  # noqa: E402
from agme_hub.engine.repair import collect_refit_stats, solve_refit  # noqa: E402


def editable_names(model: torch.nn.Module) -> list[str]:
    names = []
    for name, _ in model.named_modules():
        try:
            editable_layer(model, name)
        except Exception:  # noqa: BLE001 (not an editable layer: norms, depthwise convs, containers)
            continue
        names.append(name)
    return names


def main(specs: list[str], second: bool = False) -> None:
    torch.set_num_threads(1)
    test = load_images("fashion-mnist", split="test")
    for spec in specs:
        name, model, trigger, target, edit, held, pre, layers, lam, head, floor = fixed_setting(spec, test)
        order = editable_names(model)
        first = min(map(order.index, layers))
        before_head = [n for n in order[first:order.index(head)] if n not in layers]  # maps between edit and head

        def pairs():
            return augmented_pairs(edit.images, edit.labels, trigger, copies=9, seed=0)

        def show(label, m):
            r = measure(m, held, pre, trigger=trigger, target=target)
            print(f"| {name} | {label} | {r.clean_accuracy:.1%} | {r.attack_success_rate:.1%} | "
                  f"{r.target_accuracy:.1%} |", flush=True)

        def edited(*, weight=4.0, protect=None):
            out = copy.deepcopy(model)
            apply_edit(out, stats, lam=lam, gamma=1.0, target_weight=weight, protect=protect)
            return out

        def refit(m, names, *, ridge, weight=4.0, gamma=1.0):
            out = copy.deepcopy(m)
            for n in names:  # shallow to deep, each on the keys of the maps already re-fitted
                s = collect_refit_stats(out, model, n, pairs(), pre, target=target)
                layer = editable_layer(out, n)
                layer.set_weight_matrix(solve_refit(editable_layer(model, n).weight_matrix().double(),
                                                    layer.weight_matrix().double(), s, lam=ridge, gamma=gamma,
                                                    target_weight=weight))
            return out

        print(f"\n{spec}: natural confusion {floor:.1%}; layers {layers}; map before the head {before_head[-1:]}\n\n"
              "| model | variant | CA | ASR | TA |\n|---|---|---|---|---|", flush=True)
        show("backdoored", model)
        stats = {n: s[0] for n, s in collect_stats(model, layers, pairs(), pre, target=target).items()}
        base = edited()
        show("w_t 4", base)
        if second:  # the second batch: around the best first-batch point (re-fit ridge 0.001)
            for r in (1e-4, 1e-3):
                show(f"w_t 4 + re-fit (ridge {r:g})", refit(base, [head], ridge=r))
            for g in (2.0, 4.0):
                show(f"w_t 4 + re-fit (ridge 0.001, gamma {g:g})", refit(base, [head], ridge=1e-3, gamma=g))
            for w in (1.0, 16.0):
                show(f"w_t 4 + re-fit (ridge 0.001, w_t {w:g})", refit(base, [head], ridge=1e-3, weight=w))
            if before_head:
                show(f"w_t 4 + re-fit of {before_head[-1]} then the head (ridge 0.001)",
                     refit(base, [before_head[-1], head], ridge=1e-3))
                show(f"w_t 4 + re-fit of {before_head[-1]} then the head (lam)",
                     refit(base, [before_head[-1], head], ridge=lam))
            continue
        show("w_t 4 + re-fit (lam)", refit(base, [head], ridge=lam))
        for r in sorted({lam / 10, lam * 10, 0.001, 0.1} - {lam}):
            show(f"w_t 4 + re-fit (ridge {r:g})", refit(base, [head], ridge=r))
        prot = edited(protect=0.9)
        show("protect 0.9, w_t 4", prot)
        show("protect 0.9, w_t 4 + re-fit (lam)", refit(prot, [head], ridge=lam))
        if before_head:
            show(f"w_t 4 + re-fit of {before_head[-1]} then the head (lam)",
                 refit(base, [before_head[-1], head], ridge=lam))
            show(f"protect 0.9 + re-fit of {before_head[-1]} then the head (lam)",
                 refit(prot, [before_head[-1], head], ridge=lam))


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--second"], second="--second" in sys.argv)
