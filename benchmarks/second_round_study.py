"""no-BDK in two rounds: surrogates reconstructed again on the edited model, and forgotten too (issue 12).

    PYTHONPATH=$PWD python benchmarks/second_round_study.py bench-mobilenetv3-blend bench-efficientnet-sig

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class). Target given, trigger never given to ``clean``. A surrogate is reconstructed on the backdoored model;
the edit forgets it, and what is left of the backdoor may answer to another trigger. Round 2 runs ``clean`` once
more on round 1's model: new surrogates, inverted against the edited network, a new cross-validated edit (its
preserve term keeps round 1's outputs). ``success``: the fraction of D minus the target each round's surrogates
send to the target before its edit (the evidence a round has). The held-out numbers choose nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402


def main(names: list[str]) -> None:
    for name, model, trigger, target, edit, held in each_model(names):
        current = model
        for round_ in (1, 2):
            start = time.perf_counter()
            result = clean(current, edit, target=target, seed=0)
            success = ", ".join(f"{s.kind} {s.success:.0%}" for s in result.surrogates)
            print(f"  round {round_}: {pct(evaluate(result.model, held, trigger, target))}; success {success}; "
                  f"{','.join(result.layers)} lam {result.lam}, forgot {result.selection.forget}; "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            current = result.model


if __name__ == "__main__":
    main(sys.argv[1:])
