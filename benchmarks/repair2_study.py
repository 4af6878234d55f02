"""More repairs of the target class, measured on held-out images (issue 13, part 2, second round).

    PYTHONPATH=$PWD nice -n 10 python benchmarks/repair2_study.py bench-resnet demo
    PYTHONPATH=$PWD nice -n 10 python benchmarks/repair2_study.py bench-resnet:entry:0.1   # fixed group and lam
    PYTHONPATH=$PWD nice -n 10 python benchmarks/repair2_study.py --short bench-convnext-blend:entry:0.1

For each backdoored model: the engine's own run (cross-validation on D chooses layers and lam; its numbers
are what `agme demo` / the bench report), then, at the layers and lam it chose, each repair variant,
measured on the held-out images. Held-out numbers compare variants at fixed strengths; they choose nothing.

Models: ``bench-resnet`` = the bench's resnet10t, white patch, target 0 (its cache; the bench's split:
100 held-out images per class, D = 10 per class from the rest, as `agme bench --ablation`); ``demo`` =
`agme demo`'s model (D = 10 per class of the test split, seed 0; held out = the rest).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from agme_hub.constants import cache_dir
from agme_hub.data import Preprocessor, balanced_indices, load_images, split_edit_eval
from agme_hub.engine import clean
from agme_hub.engine.edit import augmented_pairs, collect_stats, solve_edit
from agme_hub.engine.layers import editable_layer
from agme_hub.engine.metrics import measure, predict
from agme_hub.engine.repair import collect_refit_stats, solve_refit
from agme_hub.hub.checkpoint import load_model
from agme_hub.lab.bench import BenchConfig, backdoored_model, resolve_trigger
from agme_hub.lab.demo import DEMO_BACKDOOR, demo_model_dir
from agme_hub.triggers import parse_trigger


def setting(name: str, test):
    """``demo``, ``bench-resnet`` (= ``bench-resnet10t-badnets-white-br``) or ``bench-ARCH-TRIGGER`` of the bench."""
    if name == "demo":
        edit, held = split_edit_eval(test, 10, seed=0)
        return load_model(demo_model_dir()), parse_trigger(str(DEMO_BACKDOOR["trigger"])), 0, edit, held
    arch, trigger = ("resnet10t", "badnets-white-br") if name == "bench-resnet" else name[6:].split("-", 1)
    eval_idx = balanced_indices(test.labels, 100, seed=10_007)
    held = test.subset(eval_idx, "held out")
    pool = test.subset(np.setdiff1d(np.arange(len(test)), eval_idx), "pool")
    edit, _ = split_edit_eval(pool, 10, seed=0)
    spec = resolve_trigger(trigger, test.image_shape, Path("/tmp/agme-triggers"))
    model, _ = backdoored_model(cache_dir() / "bench", "fashion-mnist", arch, trigger, spec, 0,
                                BenchConfig.quick(), test.image_shape)
    return model, parse_trigger(spec), 0, edit, held


def fixed_setting(spec: str, test):
    """``MODEL:GROUP:LAM``: the model's setting, its preprocessor, the group's layers, lam, the classifier's name
    and the natural confusion of the held-out images (as the fixed-layer studies read it)."""
    from agme_hub.engine import inspect_layers
    from agme_hub.engine.layers import classifier_name

    name, group, lam = spec.split(":")
    model, trigger, target, edit, held = setting(name, test)
    pre = Preprocessor.from_model(model)
    layers = list(inspect_layers(model).groups[group])
    head = classifier_name(model, pre(edit.images[:2]))
    floor = float((predict(model, held.images[held.labels != target], pre) == target).mean())
    return name, model, trigger, target, edit, held, pre, layers, float(lam), head, floor


def each_model(names: list[str], *, threads: int = 1, natural: bool = False):
    """Per MODEL its setting, after printing its CA / ASR / TA before any edit (and, with ``natural``, the held-out
    natural confusion: the bar's base)."""
    from agme_hub.engine import evaluate
    from agme_hub.engine.metrics import natural_confusion

    torch.set_num_threads(threads)
    test = load_images("fashion-mnist", split="test")
    for name in names:
        model, trigger, target, edit, held = setting(name, test)
        line = f"{name}: before {ca_asr_ta(evaluate(model, held, trigger, target))}"
        if natural:
            rate = natural_confusion(model, held, Preprocessor.from_model(model), target)
            line += f", natural confusion {100 * rate:.1f}"
        print(line, flush=True)
        yield name, model, trigger, target, edit, held


def ca_asr_ta(metrics) -> str:
    """``CA / ASR / TA`` in percent, as the studies' tables print them."""
    return (f"{100 * metrics.clean_accuracy:.1f} / {100 * metrics.attack_success_rate:.1f} / "
            f"{100 * metrics.target_accuracy:.1f}")

def refit(edited, original, edit, trigger, target, pre, *, lam, gamma=1.0, target_weight=4.0):
    """The second pass on the classifier (engine/repair.py), on D plus 9 augmented copies."""
    head = original.get_classifier() if hasattr(original, "get_classifier") else None
    name = next(n for n, m in original.named_modules() if m is head)
    stats = collect_refit_stats(edited, original, name, augmented_pairs(edit.images, edit.labels, trigger, copies=9,
                                                                        seed=0), pre, target=target)
    out = copy.deepcopy(edited)
    layer = editable_layer(out, name)
    w = solve_refit(editable_layer(original, name).weight_matrix(), layer.weight_matrix(), stats, lam=lam,
                    gamma=gamma, target_weight=target_weight)
    layer.set_weight_matrix(w)
    return out


class _NoTrigger:
    """Leaves images as they are: pairs of a clean image with itself add to the preserve term only."""

    applies_to_any_image = True

    def apply(self, images):
        return images


def more_target_copies(model, edit, trigger, target, pre, layers, *, lam, copies=30, target_weight=4.0):
    """The edit with ``copies`` extra augmented copies of the clean target-class images in the preserve term.

    The extra rows are pairs (x, x): in the forget term they ask for W0 k(x) too, so they weigh 1 + gamma.
    """
    pairs = augmented_pairs(edit.images, edit.labels, trigger, copies=9, seed=0)
    stats = {n: s[0] for n, s in collect_stats(model, list(layers), pairs, pre, target=target).items()}
    mask = edit.labels == target
    extra = augmented_pairs(edit.images[mask], edit.labels[mask], _NoTrigger(), copies=copies, seed=1)
    extra_stats = {n: s[0] for n, s in collect_stats(model, list(layers), extra, pre, target=target).items()}
    out = copy.deepcopy(model)
    for n in layers:
        layer = editable_layer(out, n)
        layer.set_weight_matrix(solve_edit(layer.weight_matrix(), stats[n] + extra_stats[n], lam=lam, gamma=1.0,
                                           target_weight=target_weight))
    return out


def main(names, short=False):
    torch.set_num_threads(1)
    test = load_images("fashion-mnist", split="test")
    for spec in names:
        name, _, fixed = spec.partition(":")  # NAME or NAME:GROUP:LAM (skip the engine's own run)
        model, trigger, target, edit, held, = setting(name, test)
        pre = Preprocessor.from_model(model)
        others = held.images[held.labels != target]
        floor = float((predict(model, others, pre) == target).mean())

        def show(label, m):
            m = measure(m, held, pre, trigger=trigger, target=target)
            print(f"| {name} | {label} | {m.clean_accuracy:.1%} | {m.attack_success_rate:.1%} | "
                  f"{m.target_accuracy:.1%} |", flush=True)

        print(f"\n{name}: natural confusion {floor:.1%}\n\n| model | variant | CA | ASR | TA |\n|---|---|---|---|---|")
        show("backdoored", model)
        if fixed:
            group, lam = fixed.split(":")
            from agme_hub.engine import inspect_layers
            groups = inspect_layers(model).groups
            variants = [(tuple(groups[group]), float(lam))]
        else:
            res = clean(model, edit, trigger=trigger, target=target)
            print(f"engine chose {res.layers} lam {res.lam:g}", flush=True)
            show(f"engine ({'+'.join(res.layers)}, lam {res.lam:g}), w_t 4", res.model)
            show("engine, no repair", res.unrepaired_model)
            groups = res.candidates.groups
            variants = [(tuple(res.layers), res.lam)]
            entry = tuple(groups.get("entry", ()))
            if entry and entry != variants[0][0]:  # the entry group too: where a re-fit of the classifier can act
                variants.append((entry, res.lam))
        for group_layers, group_lam in variants:
            tag = f"{'+'.join(group_layers)} lam {group_lam:g}"
            base = clean(model, edit, trigger=trigger, target=target, layers=group_layers, lam=group_lam)
            show(f"{tag}: w_t 4", base.model)
            show(f"{tag}: w_t 1", base.unrepaired_model)
            if short:
                if not set(groups["classifier"]) & set(group_layers):
                    show(f"{tag}: w_t 4 + classifier re-fit (w_t 4)",
                         refit(base.model, model, edit, trigger, target, pre, lam=group_lam))
                continue
            if not set(groups["classifier"]) & set(group_layers):
                for wt in (4.0, 16.0):
                    show(f"{tag}: w_t 4 + classifier re-fit (w_t {wt:g})",
                         refit(base.model, model, edit, trigger, target, pre, lam=group_lam, target_weight=wt))
                show(f"{tag}: w_t 4 + classifier re-fit (w_t 4, gamma 3)",
                     refit(base.model, model, edit, trigger, target, pre, lam=group_lam, gamma=3.0))
                show(f"{tag}: w_t 1 + classifier re-fit (w_t 4)",
                     refit(base.unrepaired_model, model, edit, trigger, target, pre, lam=group_lam))
            show(f"{tag}: w_t 4 + 30 more augmented copies of the target images (preserve only)",
                 more_target_copies(model, edit, trigger, target, pre, group_layers, lam=group_lam))
            for wt in (9.0,):
                show(f"{tag}: w_t {wt:g} (class-balanced: target = all others)",
                     clean(model, edit, trigger=trigger, target=target, layers=group_layers, lam=group_lam,
                           target_weight=wt).model)
            bn = clean(model, edit, trigger=trigger, target=target, layers=group_layers, lam=group_lam,
                       bn_stats="recompute")
            show(f"{tag}: w_t 4 + BN averages recomputed", bn.model)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if a != "--short"], short="--short" in sys.argv)
