"""Why the cross-validation picks the classifier on the bench's ViT (issue 13): its held-out table beside a
measurement on other held-out images, per (group, lam).

    PYTHONPATH=$PWD python benchmarks/vit_select_study.py bench-vit-badnets-white-br bench-vit-blend

For each model (as in ``repair2_study.py``: the bench's cache, D = 10 per class, 100 other images per class held
out), the engine's own run with the lam grid widened to 0.001 prints the cross-validation's table (held-out fold
CA / TA / ASR, score); then every (group, lam) of that table is run as a fixed edit and measured on the held-out
images. The held-out numbers choose nothing: they say whether the folds rank the settings as other images do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import setting  # noqa: E402

from agme_hub.data import Preprocessor, load_images  # noqa: E402
from agme_hub.engine import clean  # noqa: E402
from agme_hub.engine.metrics import measure  # noqa: E402

LAMS = (0.001, 0.01, 0.1, 1.0)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    test = load_images("fashion-mnist", split="test")
    for name in names:
        model, trigger, target, edit, held = setting(name, test)
        pre = Preprocessor.from_model(model)
        base = measure(model, held, pre, trigger=trigger, target=target)
        print(f"## {name}: backdoored CA {base.clean_accuracy:.1%} ASR {base.attack_success_rate:.1%} "
              f"TA {base.target_accuracy:.1%}", flush=True)
        result = clean(model, edit, trigger=trigger, target=target, lam_grid=LAMS)
        print(result.selection.describe(), flush=True)
        print("| group | lam | fold CA | fold TA | fold ASR | fold score | held CA | held TA | held ASR | held score |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in result.selection.table:
            fixed = clean(model, edit, trigger=trigger, target=target, lam=row["lam"],
                          layers=result.candidates.groups[row["group"]])
            m = measure(fixed.model, held, pre, trigger=trigger, target=target)
            score = m.clean_accuracy + 0.5 * m.target_accuracy - 2 * m.attack_success_rate
            print(f"| {row['group']} | {row['lam']:g} | {row['ca']:.1%} | {row['ta']:.1%} | {row['asr']:.1%} | "
                  f"{row['score']:.3f} | {m.clean_accuracy:.1%} | {m.target_accuracy:.1%} | "
                  f"{m.attack_success_rate:.1%} | {score:.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
