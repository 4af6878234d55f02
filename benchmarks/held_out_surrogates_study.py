"""no-BDK with held-out surrogates: the cross-validation scored on a trigger its edits never forgot (issue 12).

    PYTHONPATH=$PWD python benchmarks/held_out_surrogates_study.py bench-vit-blend bench-resnet10t-sig

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class). Target given, trigger never given to ``clean``. ``default``: the engine as it ships (the
cross-validation's ASR is the held-out success of the very surrogates a trial forgot, so an edit that forgets
their exact pattern, not the backdoor, scores well). ``held-out``: ``held_out_surrogates=True``, a second draw of
each surrogate (seed + 1) is reconstructed and never forgotten, and its held-out success is the ASR the trials are
ranked by. Both variants run in the same process, one after the other; the held-out numbers choose nothing.
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
        for label, held_out in (("default", False), ("held-out", True)):
            start = time.perf_counter()
            result = clean(model, edit, target=target, seed=0, held_out_surrogates=held_out)
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam:g}, forgot {result.selection.forget}; {time.perf_counter() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
