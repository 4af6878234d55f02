"""no-BDK with two draws of each surrogate: does forgetting more of them cut the real trigger's ASR? (issue 12)

    PYTHONPATH=$PWD python benchmarks/surrogate_draws_study.py bench-mobilenetv3-badnets-white-br bench-mobilenetv3-blend

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class). Target given, trigger never given to ``clean``. ``default``: the engine as it ships (one patch and
one full-image surrogate, the cross-validation forgets each alone or both). ``two-draws``: a second patch and
full-image surrogate reconstructed from seed + 1 (``patch2``, ``full2``); the cross-validation chooses among
each of the four alone and all four, its ASR proxy the mean held-out success of all four. The second draw is
added by wrapping the engine's ``reconstruct_surrogates`` for this study only; the held-out numbers choose
nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402
from agme_hub.engine import surrogates as surrogate_module  # noqa: E402

ENGINE = sys.modules["agme_hub.engine.clean"]  # the module (``agme_hub.engine.clean`` is also the function)
ONE_DRAW = surrogate_module.reconstruct_surrogates


def two_draws(model, data, target, kinds, *, steps, seed=0, patch=None, eval_batch_size=256, progress=None):
    out = ONE_DRAW(model, data, target, kinds, steps=steps, seed=seed, patch=patch, eval_batch_size=eval_batch_size)
    second = ONE_DRAW(model, data, target, kinds, steps=steps, seed=seed + 1, eval_batch_size=eval_batch_size)
    out.update({f"{kind}2": surrogate for kind, surrogate in second.items()})
    return out


def main(names: list[str]) -> None:
    for name, model, trigger, target, edit, held in each_model(names):
        for label, reconstruct in (("default", ONE_DRAW), ("two-draws", two_draws)):
            ENGINE.reconstruct_surrogates = reconstruct
            start = time.perf_counter()
            result = clean(model, edit, target=target, seed=0)
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam}, forgot {result.selection.forget}; {time.perf_counter() - start:.0f} s",
                  flush=True)
        ENGINE.reconstruct_surrogates = ONE_DRAW


if __name__ == "__main__":
    main(sys.argv[1:])
