"""no-BDK: does forgetting three triggers outweigh the preserve term? (issue 12, after stop 25's region)

    PYTHONPATH=$PWD python benchmarks/forget_weight_study.py bench-mobilenetv3-blend ...

Since stop 25 no-BDK forgets three triggers at once (the patch surrogate, its region, the full-image surrogate),
each with the weight gamma, against one preserve term: the forget terms weigh three times what one trigger's did.
On the `neck` chain of MobileNetV3 and EfficientNet the target class paid 11-13 pt more (docs/METHOD.md, "The
patch surrogate's place"). ``mean``: the same edit with the forget terms averaged instead of summed (each trigger
weighs gamma / 3), in the cross-validation's trials and in the final edit alike. ``default``: the engine as it
ships. MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out
images per class). Target given, trigger never given; the held-out numbers choose nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402
from agme_hub.engine.edit import GramStats, forget_sum  # noqa: E402

ENGINES = [sys.modules["agme_hub.engine.select"], sys.modules["agme_hub.engine.clean"]]


def mean_forget(stats: list[GramStats]) -> GramStats:
    """The forget terms' mean: ``forget_sum`` divided by the number of triggers (the preserve term is unchanged)."""
    total = forget_sum(stats)
    n = len(stats)
    return GramStats(total.cc, total.cc_target, total.tt / n, total.ct / n, total.rows, total.block)


def main(names: list[str]) -> None:
    for name, model, trigger, target, edit, held in each_model(names, natural=True):
        for label, combine in (("default", forget_sum), ("mean", mean_forget)):
            for module in ENGINES:
                module.forget_sum = combine
            start = time.perf_counter()
            result = clean(model, edit, target=target, seed=0)
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam}; {time.perf_counter() - start:.0f} s", flush=True)
        for module in ENGINES:
            module.forget_sum = forget_sum


if __name__ == "__main__":
    main(sys.argv[1:])
