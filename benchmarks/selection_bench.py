"""The five-family bench's trigger-known cells with another selection by the cross-validation (issue 13).

    PYTHONPATH=$PWD python benchmarks/selection_bench.py --out /tmp/weight-grid --variant weights resnet10t convnext
    PYTHONPATH=$PWD python benchmarks/selection_bench.py --compare /tmp/weight-grid

The grid of ``benchmarks/results/fmnist-5arch`` (Fashion-MNIST, 10 triggers, 10 images per class, seed 0, the
same cached or retrained models), defence ``agme-bdk`` only, with a variant's options passed to
``agme_hub.clean`` (``BenchConfig.agme_options``): ``default``, none (the engine as it ships, to pair with the
others on the same models); ``score``, the rule of stop 23 (each held-out image counted 0 or 1); ``weights``, that
rule also choosing the repair weight among 4, 9, 16, 32 (``target_weight_grid``); ``soft``, the ``soft`` rule
(the score of the held-out probabilities, the default since stop 24); ``soft-weights``, ``soft`` with the weights.
``--compare DIR [BASE]`` sets those rows beside the committed ``agme-bdk`` rows (or those of another run's folder
``BASE``) and prints both sides' means and the cells within the bar (ASR <= natural confusion + 2 pt), first over
the cells whose backdoored model is the committed one (the same before-numbers), then over all.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bar_selection_study import VARIANTS as STUDY_VARIANTS  # noqa: E402

from agme_hub.lab.bench import BenchConfig, config_with, run_bench  # noqa: E402

COMMITTED = Path(__file__).resolve().parent / "results" / "fmnist-5arch" / "runs.partial.jsonl"
TRIGGERS = ("badnets-white-br", "badnets-checker-br", "badnets-noise-center", "badnets-bar-bl", "badnets-red-tr",
            "blend", "image", "additive", "sig", "warp")
# the study's variants (bar_selection_study.py) by the names this bench's commands use
VARIANTS = {name: STUDY_VARIANTS[name] for name in ("default", "score", "soft", "soft-weights")} | {
    "weights": STUDY_VARIANTS["score-weights"]}


def run(out: str, variant: str, archs: list[str]) -> None:
    config = config_with(BenchConfig.full(), datasets=("fashion-mnist",), archs=tuple(archs), triggers=TRIGGERS,
                         budgets=(10,), seeds=(0,), defences=("agme-bdk",))
    config = dataclasses.replace(config, agme_options=VARIANTS[variant])
    run_bench(config, out, command="python benchmarks/selection_bench.py " + " ".join(sys.argv[1:]))


def _means(label: str, rows: list[dict]) -> str:
    n = len(rows)
    mean = lambda f: 100 * sum(map(f, rows)) / n  # noqa: E731
    bar = sum(r["asr"] <= r["backdoor_confusion"] + 0.02 for r in rows)
    return (f"{label}: CA {mean(lambda r: r['ca'] - r['backdoor_ca']):+.2f} pt, ASR {mean(lambda r: r['asr']):.2f}%, "
            f"TA {mean(lambda r: r['ta'] - r['backdoor_ta']):+.2f} pt (worst "
            f"{100 * min(r['ta'] - r['backdoor_ta'] for r in rows):+.1f}), within the bar {bar} of {n}")


def compare(folder: str, base: str | None = None) -> None:
    def cells(path: Path) -> dict:
        rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return {(r["arch"], r["trigger"]): r for r in rows if r["defence"] == "agme-bdk" and r["backdoor_ok"]}

    committed = cells(Path(base) / "runs.partial.jsonl" if base else COMMITTED)
    offered = cells(Path(folder) / "runs.partial.jsonl")
    pairs = [(committed[k], offered[k]) for k in offered if k in committed]
    same = [(a, b) for a, b in pairs if (a["backdoor_ca"], a["backdoor_asr"]) == (b["backdoor_ca"], b["backdoor_asr"])]
    for label, chosen in (("same models", same), ("all", pairs)):
        choice = lambda r: (r["hparams"].get("layers"), r["hparams"].get("lam"))  # noqa: E731
        print(f"{label}, {len(chosen)} cells; the choice differs in {sum(choice(a) != choice(b) for a, b in chosen)}; "
              f"the weight chosen above 4 in "
              f"{sum(b['hparams'].get('target_weight', 4.0) != 4.0 for _, b in chosen)}")
        print("  " + _means(base or "committed", [a for a, _ in chosen]))
        print("  " + _means("the variant", [b for _, b in chosen]))
    for a, b in same:
        before, after = (r["asr"] <= r["backdoor_confusion"] + 0.02 for r in (a, b))
        if before != after:
            print(f"  {b['arch']} {b['trigger']}: ASR {100 * a['asr']:.1f} -> {100 * b['asr']:.1f}% "
                  f"(natural {100 * b['backdoor_confusion']:.1f}%), w_t {b['hparams'].get('target_weight')}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--compare"]:
        compare(*args[1:3])
    else:
        variant = "weights"
        if "--variant" in args:
            at = args.index("--variant")
            variant = args[at + 1]
            del args[at:at + 2]
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        run(args[1], variant, args[2:])
