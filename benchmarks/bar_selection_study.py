"""The cross-validation's selection rules and the repair weight offered, on the studies' cached models (issue 13).

    PYTHONPATH=$PWD python benchmarks/bar_selection_study.py bench-mobilenetv3-blend bench-efficientnet-badnets-white-br
    PYTHONPATH=$PWD python benchmarks/bar_selection_study.py --variants score-weights bench-mobilenetv3-blend

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class); trigger known. ``default``: the engine as it ships (``selection="soft"`` since stop 24, w_t = 4).
``score``: the rule of stops 19-23 (``ca + 0.5 ta - 2 asr``, each held-out image counted 0 or 1). ``bar``:
``selection="bar"`` (the settings whose fold ASR is within D's natural confusion + 2 pt, then the most CA + TA/2)
with ``target_weight_grid=(4, 9, 16, 32)``. ``score-weights``: the ``score`` rule with the same weights offered.
``soft``: the score of the held-out probabilities; ``soft-weights``: with the weights offered.
``--variants a,b`` runs those only (default: ``score,bar``, the comparison of stop 22). CA / ASR / TA on the held-out
images, and the held-out natural confusion (the bar is it + 2 pt); the held-out numbers choose nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402

WEIGHTS = (4.0, 9.0, 16.0, 32.0)
VARIANTS = {"default": {}, "score": dict(selection="score"), "bar": dict(selection="bar", target_weight_grid=WEIGHTS),
            "score-weights": dict(selection="score", target_weight_grid=WEIGHTS), "soft": dict(selection="soft"),
            "soft-weights": dict(selection="soft", target_weight_grid=WEIGHTS)}


def main(names: list[str], variants: list[str]) -> None:
    for name, model, trigger, target, edit, held in each_model(names, natural=True):
        for label in variants:
            overrides = VARIANTS[label]
            start = time.perf_counter()
            result = clean(model, edit, trigger=trigger, target=target, seed=0, **overrides)
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam} w_t {result.target_weight:g}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = ["score", "bar"]
    if "--variants" in args:
        at = args.index("--variants")
        chosen = args[at + 1].split(",")
        del args[at:at + 2]
    main(args, chosen)
