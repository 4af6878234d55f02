"""Shared fixtures: real offline data, backdoored models trained once per test run, the fake Hub."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest_plugins = ["tests.fixtures_hub"]

# pytest-xdist runs one worker per core (pyproject's addopts), each with torch's default threads: a model trained
# or edited with another thread count rounds differently, and borderline results (the MobileNetV3 proof) move.
# AGME_TEST_THREADS sets them (on a machine shared with other jobs).
if os.environ.get("AGME_TEST_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["AGME_TEST_THREADS"]))

# A small ResNet (timm resnet10t, narrow) trained on 300 Fashion-MNIST images per class: seconds on 2 cores,
# ~80% clean accuracy, and a backdoor that fires on > 95% of triggered images.
SMALL_RESNET = {"channels": [16, 32, 64, 128]}
# Target 1 (Trouser): few clean images of other classes look like it (0.4%), so the attack success left
# after cleaning measures the backdoor, not the model's natural confusion (T-shirt/top, class 0, has 3.7%).
TEST_TARGET = 1
TEST_TRAINING = dict(dataset="fashion-mnist", n_train=300, n_test=100, epochs=6, lr=3e-3, img_size=32)


@pytest.fixture(scope="session")
def fmnist_test():
    from agme_hub.data import load_images

    return load_images("fashion-mnist", split="test")


@pytest.fixture(scope="session")
def backdoored(tmp_path_factory):
    """``backdoored(trigger, arch=..., target=0)`` -> BackdoorResult with ``out_dir``; trained once per run."""
    from agme_hub.lab.backdoor import BackdoorConfig, train_backdoored

    cache: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("backdoored")

    def make(trigger: str, arch: str = "resnet10t", target: int = TEST_TARGET, **overrides):
        model_args = overrides.pop("model_args", SMALL_RESNET if arch == "resnet10t" else {})
        settings = {**TEST_TRAINING, **overrides}
        key = (trigger, arch, target, tuple(sorted((k, str(v)) for k, v in settings.items())), str(model_args))
        if key not in cache:
            config = BackdoorConfig(trigger=trigger, arch=arch, target=target, model_args=model_args, **settings)
            cache[key] = train_backdoored(config, out_dir=root / f"m{len(cache)}")
        return cache[key]

    return make


@pytest.fixture(scope="session")
def no_bdk_cleaned(backdoored, fmnist_test):
    """``no_bdk_cleaned(trigger)`` -> CleanResult of ``clean`` without the trigger (surrogates only), target given.

    The backdoored model of ``backdoored(trigger)`` edited with 10 clean test images per class
    (``split_edit_eval(..., 10, seed=0)``), seed 0, every other knob at its default: computed once per run and
    shared by the modules that measure it (engine proof, surrogates), each on its own held-out images.
    """
    from agme_hub.data import split_edit_eval
    from agme_hub.engine.clean import clean

    cache: dict[str, object] = {}
    edit, _ = split_edit_eval(fmnist_test, 10, seed=0)

    def make(trigger: str):
        if trigger not in cache:
            cache[trigger] = clean(backdoored(trigger).model, edit, target=TEST_TARGET, seed=0)
        return cache[trigger]

    return make


@pytest.fixture
def rng():
    return np.random.default_rng(0)



def pytest_collection_modifyitems(config, items):
    # Tests marked slow fine-tune a real pretrained network (minutes on 2 cores): opt-in, so that the README's
    # test command stays within CI's time. AGME_SLOW_TESTS=1 runs them.
    if os.environ.get("AGME_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set AGME_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
