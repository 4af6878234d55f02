"""Why the edit fails on MobileNetV3: per-layer edits measured on held-out images (issue 13, part 1).

    PYTHONPATH=$PWD nice -n 19 python benchmarks/mnv3_study.py mnv3-checker-t1 mnv3-blend-t1

Models come from benchmarks/repair_models.py (bench settings: 300 train images per class, 10 epochs).
D = 10 clean test images per class; held-out = 100 other test images per class. Layers and lam are
fixed per row here (a study of which layer can work); the engine's own choice is the row "engine".
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from agme_hub.hub.checkpoint import load_model
from agme_hub.data import Preprocessor, load_images, split_edit_eval
from agme_hub.engine import clean
from agme_hub.engine.metrics import measure, predict
from agme_hub.triggers import parse_trigger
from agme_hub.engine.layers import find_candidates

sys.path.insert(0, "benchmarks")
from repair_models import SETTINGS, TRIGGERS, model_dir  # noqa: E402


def row(label, model, held, pre, trig, target, floor=None):
    m = measure(model, held, pre, trigger=trig, target=target)
    print(f"| {label} | {m.clean_accuracy:.1%} | {m.attack_success_rate:.1%} | {m.target_accuracy:.1%} |", flush=True)
    return m


def main(names, per_class=10):
    torch.set_num_threads(1)
    test = load_images("fashion-mnist", split="test")
    edit, held = split_edit_eval(test, per_class, seed=0, eval_per_class=100)
    for name in names:
        _, trig_key, target = SETTINGS[name]
        trig = parse_trigger(TRIGGERS[trig_key])
        model = load_model(model_dir(name))
        pre = Preprocessor.from_model(model)
        cands = find_candidates(model, pre(edit.images[:2]))
        nt = held.labels != target
        floor = float((predict(model, held.images[nt], pre) == target).mean())
        print(f"\n## {name} (target {target}); candidates {cands.groups}; natural confusion {floor:.1%}")
        print("| edit | CA | ASR | TA |\n|---|---|---|---|")
        row("backdoored", model, held, pre, trig, target)
        res = clean(model, edit, trigger=trig, target=target)
        row(f"engine: {res.layers} lam {res.lam:g}", res.model, held, pre, trig, target)
        extra = [l for l in sys.argv if l.startswith("--layers=")]
        layer_sets = [[s] for s in ("conv_head", "classifier")] + [list(cands.groups.get("entry", []))] + \
                     [["conv_head", "classifier"], ["blocks.5.0.conv"]] + \
                     [e.split("=", 1)[1].split("+") for e in extra]
        for layers in layer_sets:
            if not layers:
                continue
            for lam in (0.01, 0.1, 1.0):
                try:
                    r = clean(model, edit, trigger=trig, target=target, layers=layers, lam=lam)
                except Exception as exc:  # noqa: BLE001 - a study: report and go on
                    print(f"| {'+'.join(layers)} lam {lam:g} | failed: {exc} |||")
                    break
                row(f"{'+'.join(layers)} lam {lam:g}", r.model, held, pre, trig, target)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--")])
