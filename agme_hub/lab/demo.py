"""The embedded default job: a small ResNet backdoored on Fashion-MNIST, cleaned with 10 images per class.

Lab work (training a backdoor) feeding the product (``clean_source``): ``agme demo`` runs it offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..app import Reporter, run_clean
from ..devices import resolve_device
from ..options import CleanOptions
from ..progress import ProgressCallback
from ..report import CleanReport
from .backdoor import BackdoorConfig, cached_backdoored

__all__ = ["DEMO_BACKDOOR", "demo_model_dir", "run_demo"]

# The embedded default job: a small ResNet backdoored on Fashion-MNIST with a BadNets patch.
DEMO_BACKDOOR = dict(dataset="fashion-mnist", arch="resnet10t", trigger="badnets-white-br", target=0,
                     poison_rate=0.1, epochs=2, seed=0, n_train=None, n_test=None,
                     model_args={"channels": [16, 32, 64, 128]})


def demo_model_dir() -> Path:
    """Train the demo's backdoored model once and cache it (``AGME_CACHE``); returns its folder."""
    return cached_backdoored(BackdoorConfig(**DEMO_BACKDOOR), prefix="demo-fashion-mnist-resnet-", key=DEMO_BACKDOOR,
                             progress=True)


def run_demo(*, out: str | os.PathLike[str] | None = None, per_class: int = 10,
             report: Reporter | None = None, device: str = "auto", batch_size: int | None = None,
             progress: ProgressCallback | None = None) -> CleanReport:
    """Backdoor (or reuse) a ResNet on Fashion-MNIST, clean it with ``per_class`` images per class.

    ``device`` and ``batch_size`` are the clean's (checked before anything is trained); the demo model is
    trained once, on the CPU, and cached.
    """
    options = CleanOptions(data="fashion-mnist", trigger=str(DEMO_BACKDOOR["trigger"]), target="0",
                           per_class=per_class, out=str(out or Path.cwd() / "fashion-mnist-demo-agme"),
                           device=device, batch_size=batch_size)
    resolve_device(options.device)  # a missing GPU fails before the training
    say = report or (lambda line: None)
    say("training (or reusing) the backdoored demo model")
    folder = demo_model_dir()
    return run_clean(str(folder), options, report=report, progress=progress)
