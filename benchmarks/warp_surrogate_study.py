"""no-BDK: a warp surrogate beside the patch and the full-image one? (issue 12)

    PYTHONPATH=$PWD python benchmarks/warp_surrogate_study.py [--variants no-warp,default] MODEL...

Why: the five-family bench of stop 25 (trigger unknown, target given) keeps a WaNet-style warp almost whole on
ResNet-10t and ConvNeXt (held-out ASR 56.7% and 58.2%): a warp moves every pixel a little, which neither a small
mask nor a bounded additive perturbation describes. ``warp``: a third surrogate, a smooth displacement field
(:func:`agme_hub.engine.surrogates.invert_warp`, ``DEFAULT_SURROGATE_WARP_GRID`` control values per axis, at most
``DEFAULT_SURROGATE_WARP_PX`` pixels) optimised on D toward the target like the others, and forgotten with them
and with fresh random warps of its size; made only where random warps reach the target (``warp_evidence``).
``default``: the engine's (since stop 26: ``patch``, ``full``, ``warp`` on evidence); ``no-warp``: stop 25's
(``patch``, ``full``).

A warp the surrogate was not set from: ``bench-resnet10t-python:agme_hub.lab.warps:other_warp`` (trained by the
bench's recipe on first use, cached).

MODEL as in ``repair2_study.py`` (the bench's cached models, D = 10 images per class, 100 other held-out images
per class). Target given, trigger never given to ``clean``; the held-out numbers choose nothing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import ca_asr_ta as pct, each_model  # noqa: E402

from agme_hub.engine import clean, evaluate  # noqa: E402

VARIANTS = {"no-warp": {"surrogates": ("patch", "full")}, "default": {}}


def main(args: list[str]) -> None:
    variants = "no-warp,default"
    if "--variants" in args:
        at = args.index("--variants")
        variants, args = args[at + 1], args[:at] + args[at + 2:]
    for name, model, trigger, target, edit, held in each_model(args, natural=True):
        for label in variants.split(","):
            start = time.perf_counter()
            result = clean(model, edit, target=target, seed=0, **VARIANTS[label])
            made = ", ".join(f"{s.kind} {100 * s.success:.0f}% (size {s.size:.2f})" for s in result.surrogates)
            if result.warp_evidence is not None:
                e = result.warp_evidence
                made += f"; random warps {100 * e.random_warp_rate:.1f}% vs natural {100 * e.natural_rate:.1f}%"
            print(f"  {label}: {pct(evaluate(result.model, held, trigger, target))}; {','.join(result.layers)} "
                  f"lam {result.lam}; surrogates on D: {made}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
