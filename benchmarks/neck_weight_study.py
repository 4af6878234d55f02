"""The repair weight on the `neck` chain (issue 13): how w_t trades the target class against the backdoor there.

    PYTHONPATH=$PWD python benchmarks/neck_weight_study.py bench-mobilenetv3-blend bench-mobilenetv3-badnets-white-br \
        bench-efficientnet-badnets-white-br

MODEL as in ``repair2_study.py``; trigger known; the `neck` chain (``conv_head`` then the classifier) at lam 0.01,
the engine's defaults otherwise, with the repair weight w_t of the clean target-class images at 4 (the default),
9, 16 and 32. CA / ASR / TA on 100 other held-out images per class; they choose nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402

WEIGHTS = (4.0, 9.0, 16.0, 32.0)


def main(names: list[str]) -> None:
    # two torch threads, as the numbers in docs/METHOD.md were measured
    for name, model, trigger, target, edit, held in each_model(names, threads=2, natural=True):
        for weight in WEIGHTS:
            result = clean(model, edit, trigger=trigger, target=target, layers=["conv_head", "classifier"],
                           lam_grid=(0.01,), target_weight=weight, seed=0)
            print(f"  w_t {weight:g}: {ca_asr_ta(evaluate(result.model, held, trigger, target))}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
