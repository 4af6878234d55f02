"""no-BDK: forget the patch surrogate's *place* as well as its pattern? (issue 12)

    PYTHONPATH=$PWD python benchmarks/region_surrogate_study.py [--at GROUP:LAM] [--table] MODEL...

Why: the inverted mask + pattern reaches the target on D, yet forgetting it left part of a real sticker's backdoor
(trigger unknown, target given, ``benchmarks/results/fmnist-5arch`` of stop 24: a noise sticker at the centre
keeps ResNet 13.2%, ConvNeXt 14.3%, ViT 9.3%). The inversion finds *one* pattern that works where the trigger
sits; the real sticker shows other pixels there. ``region``: the patch surrogate is forgotten together with its
region, the surrogate's mask filled with fresh uniform noise on every image and copy (``RegionTrigger``: what any
sticker in that place could show), paired with the clean twin (``MethodOptions.surrogate_region``). The
cross-validation's sets become ``patch+region``, ``full`` and ``patch+region+full``, and its ASR proxy the held-out
success of every trigger forgotten, the region's included (random noise in the place of a real sticker reaches
its target too). ``all``: every surrogate forgotten, the cross-validation choosing layers and lam only
(``choose_surrogates=False``). ``default``: the engine of stop 24, neither. ``region-all``: both, the engine's
default since stop 25. ``--variants a,b`` (default ``default,region-all``).

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class). Target given, trigger never given to ``clean``; the held-out numbers choose nothing. ``--at
GROUP:LAM`` (e.g. ``entry:0.001``) skips the cross-validation: each variant then forgets all of its triggers
(``patch+full``; ``patch+region+full``) at the same layers and lam. ``--table``: the cross-validation's best rows.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate, inspect_layers  # noqa: E402

# the engine of stop 24 (the cross-validation chose among patch, full, patch+full), and the two changes alone and
# together; ``region-all`` is the engine's default since stop 25
VARIANTS = {"default": {"surrogate_region": False, "choose_surrogates": True},
            "region": {"surrogate_region": True, "choose_surrogates": True},
            "all": {"surrogate_region": False, "choose_surrogates": False},
            "region-all": {"surrogate_region": True, "choose_surrogates": False}}


def _take(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    if flag not in args:
        return None, args
    at = args.index(flag)
    return args[at + 1], args[:at] + args[at + 2:]


def main(args: list[str]) -> None:
    table = "--table" in args
    args = [a for a in args if a != "--table"]
    at, args = _take(args, "--at")
    variants, args = _take(args, "--variants")
    for name, model, trigger, target, edit, held in each_model(args, natural=True):
        knobs = {}
        if at:
            group, lam = at.split(":")
            knobs = {"layers": list(inspect_layers(model).groups[group]), "lam": float(lam)}
        for label in (variants or "default,region-all").split(","):
            start = time.perf_counter()
            result = clean(model, edit, target=target, seed=0, **knobs, **VARIANTS[label])
            forgot = "+".join(t.spec.split(":")[0] for t in result.forgotten)
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam}, forgot {forgot}; {time.perf_counter() - start:.0f} s", flush=True)
            if table and result.selection is not None:  # the cross-validation's best rows
                rows = sorted(result.selection.table, key=lambda r: -float(r["soft_score"]))
                for r in rows[:6]:
                    print(f"    {r.get('forget')} {r['group']} {r['lam']}: held-out CA {r['ca_p']:.3f} "
                          f"TA {r['ta_p']:.3f} ASR {r['asr_p']:.3f}, score {r['soft_score']:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
