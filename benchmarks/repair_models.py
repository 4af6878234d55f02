"""Train (or reuse) the backdoored models of the repair / MobileNetV3 study (benchmarks/repair_study.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from agme_hub.lab.backdoor import BackdoorConfig, train_backdoored
from agme_hub.lab.bench import ARCHS, TRIGGERS
from agme_hub.constants import WEIGHTS_NAME

ROOT = Path("/tmp/h13-models")

# name -> (arch key, trigger key, target)
SETTINGS = {
    "mnv3-checker-t1": ("mobilenetv3", "badnets-checker-br", 1),
    "mnv3-blend-t1": ("mobilenetv3", "blend", 1),
    "resnet-white-t0": ("resnet10t", "badnets-white-br", 0),
    "resnet-blend-t0": ("resnet10t", "blend", 0),
    "resnet-white-t1": ("resnet10t", "badnets-white-br", 1),
    "resnet-blend-t1": ("resnet10t", "blend", 1),
    "convnext-white-t0": ("convnext", "badnets-white-br", 0),
    "convnext-blend-t0": ("convnext", "blend", 0),
    "convnext-blend-t1": ("convnext", "blend", 1),
    "mnv3-checker-t0": ("mobilenetv3", "badnets-checker-br", 0),
}


def model_dir(name: str) -> Path:
    if name == "demo":  # the demo's own cached model (agme demo trains it once)
        from agme_hub.lab.demo import demo_model_dir

        return demo_model_dir()
    folder = ROOT / name
    if (folder / WEIGHTS_NAME).is_file():
        return folder
    arch, trig, target = SETTINGS[name]
    spec = ARCHS[arch]
    config = BackdoorConfig(dataset="fashion-mnist", arch=spec.timm_name, trigger=TRIGGERS[trig], target=target,
                            poison_rate=0.1, epochs=spec.epochs, seed=0, n_train=300, n_test=100, img_size=32,
                            lr=spec.lr, model_args=dict(spec.model_args))
    result = train_backdoored(config, out_dir=folder, overwrite=True)
    print(name, result.metrics.as_dict(), flush=True)
    return folder


if __name__ == "__main__":
    torch.set_num_threads(1)
    for n in sys.argv[1:]:
        model_dir(n)
