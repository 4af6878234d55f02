"""What the target class loses to the edit: scattered margins, or one shift of the target logit (issue 13).

    PYTHONPATH=$PWD python benchmarks/target_margin_study.py demo layer4.0.conv1,layer4.0.downsample.1 0.01
    PYTHONPATH=$PWD python benchmarks/target_margin_study.py bench-mobilenetv3-blend conv_head,classifier 0.01

MODEL (as in ``repair2_study.py``), the layers to edit and lam: the engine's clean with its defaults otherwise
(repair weight and re-fit), trigger known. On the held-out clean target-class images it prints the accuracy
before and after, the classes the lost images go to, and how the target's margin (its logit minus the best
other logit) moved: a mean shift that every image shares says the edit lowered the target logit as a whole, a
large spread around a small shift says it scattered the margins. Then the held-out TA and ASR a constant
correction of the target logit would give (the correction is measured here, on test images: it chooses
nothing, it only shows how the two trade).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair2_study import setting  # noqa: E402  (the same models and splits as the second round)

from agme_hub.data import Preprocessor, load_images  # noqa: E402
from agme_hub.engine import clean  # noqa: E402


def logits(model: torch.nn.Module, images: np.ndarray, pre: Preprocessor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(pre(images[i:i + 200])) for i in range(0, len(images), 200)]).numpy()


def margin(out: np.ndarray, target: int) -> np.ndarray:
    return out[:, target] - np.delete(out, target, axis=1).max(axis=1)


def main(name: str, layers: str, lam: float) -> None:
    torch.set_num_threads(1)
    test = load_images("fashion-mnist", split="test")
    model, trigger, target, edit, held = setting(name, test)
    pre = Preprocessor.from_model(model)
    edited = clean(model, edit, trigger=trigger, target=target, layers=layers.split(","), lam_grid=(lam,),
                   seed=0).model
    own = held.images[held.labels == target]
    before, after = logits(model, own, pre), logits(edited, own, pre)
    pb, pa = before.argmax(1), after.argmax(1)
    print(f"{name}: {len(own)} held-out target images, TA {100 * (pb == target).mean():.1f} -> "
          f"{100 * (pa == target).mean():.1f}")
    print("  wrong classes before:", np.bincount(pb[pb != target], minlength=10).tolist())
    print("  wrong classes after: ", np.bincount(pa[pa != target], minlength=10).tolist())
    print(f"  lost {int(((pb == target) & (pa != target)).sum())}, gained {int(((pb != target) & (pa == target)).sum())}")
    shift = margin(after, target) - margin(before, target)
    print(f"  target margin shift: mean {shift.mean():+.2f}, median {np.median(shift):+.2f}, std {shift.std():.2f}; "
          f"target logit {np.mean(after[:, target] - before[:, target]):+.2f}")
    others = held.images[held.labels != target]
    triggered = margin(logits(edited, trigger.apply(others), pre), target)
    own_after = margin(after, target)
    for correction in (0.0, 0.25, 0.5, 1.0, 2.0):
        print(f"  target logit {correction:+.2f}: TA {100 * (own_after + correction > 0).mean():.1f}, "
              f"ASR {100 * (triggered + correction > 0).mean():.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
