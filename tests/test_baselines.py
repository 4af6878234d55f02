"""Tests of the baseline defences on a tiny backdoored timm ResNet trained here on real digits.

The model: a narrow ``resnet10t`` (BatchNorm) trained on scikit-learn's 8x8 digits upsampled to 16x16,
with 10 % of the training images stamped with a 3x3 white patch in the bottom-right corner and
relabelled 0. Defences get 10 clean unseen images per class; metrics use the remaining unseen images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from agme_hub.lab.baselines import SAM, DefenseResult, list_baselines, run_baseline  # noqa: E402
from agme_hub.lab.baselines._common import _BASELINES  # noqa: E402
from agme_hub.lab.baselines.clp import pair_conv_bn  # noqa: E402
from agme_hub.errors import ClassMismatchError, ShapeMismatchError, UsageError  # noqa: E402

TARGET = 0
SIDE = 16
PER_CLASS = 10
# NC's inversion is the slow part (one per class): fewer steps than the default keep the test quick.
NC_TEST_STEPS = 30


def _stamp(raw: torch.Tensor) -> torch.Tensor:
    out = raw.clone()
    out[..., -3:, -3:] = 1.0
    return out


def _norm(raw: torch.Tensor) -> torch.Tensor:
    return (raw - 0.5) / 0.5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # These models are tiny: on a shared 2-core machine a second intra-op thread only spins against
    # other processes (measured 0.4 s with one thread, 38 s with two, for the same NC inversion).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = sklearn_datasets.load_digits()
    raw = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    raw = F.interpolate(raw, size=(SIDE, SIDE), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))
    train, unseen = perm[:1200], perm[1200:]
    budget = torch.cat([unseen[labels[unseen] == c][:PER_CLASS] for c in range(10)])
    held_out = unseen[~torch.isin(unseen, budget)]
    return {
        "train_x": raw[train], "train_y": labels[train], "budget_x": raw[budget], "budget_y": labels[budget],
        "test_x": raw[held_out], "test_y": labels[held_out],
    }


@pytest.fixture(scope="module")
def backdoored(digits: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = timm.create_model(
        "resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128), stem_width=16
    )
    # The model card of a real checkpoint states its normalisation; NC reads it from here.
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,), "std": (0.5,)}
    x, y = digits["train_x"].clone(), digits["train_y"].clone()
    poison = torch.randperm(len(x), generator=gen)[: len(x) // 10]
    x[poison], y[poison] = _stamp(x[poison]), TARGET
    epochs, batch = 8, 64
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(_norm(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _metrics(model: nn.Module, digits: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Clean accuracy and attack success rate (non-target images only) on the held-out images."""
    x, y = digits["test_x"], digits["test_y"]
    ca = float((model(_norm(x)).argmax(1) == y).float().mean())
    others = x[y != TARGET]
    asr = float((model(_norm(_stamp(others))).argmax(1) == TARGET).float().mean())
    return ca, asr


def _budget(digits: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(digits["budget_x"]), digits["budget_y"]


@pytest.fixture(scope="module")
def snapshot(backdoored: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backdoored.state_dict().items()}


@pytest.fixture(scope="module")
def results(
    backdoored: nn.Module, digits: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]
) -> dict[str, DefenseResult]:
    images, labels = _budget(digits)
    extra: dict[str, dict[str, Any]] = {"nc": {"steps": NC_TEST_STEPS}}
    return {name: run_baseline(name, backdoored, images, labels, seed=0, **extra.get(name, {}))
            for name in list_baselines()}


def test_backdoor_is_planted(backdoored: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    ca, asr = _metrics(backdoored, digits)
    assert ca > 0.9
    assert asr > 0.9


def test_registry_lists_all_defences() -> None:
    assert list_baselines() == ["clp", "fp", "ft", "ftsam", "nc"]


@pytest.mark.parametrize("name", ["clp", "fp", "ft", "ftsam", "nc"])
def test_result_contract(
    name: str, results: dict[str, DefenseResult], backdoored: nn.Module
) -> None:
    result = results[name]
    assert result.name == name
    assert result.applicable and result.reason == ""
    assert result.model is not None and result.model is not backdoored
    assert not result.model.training
    ours, theirs = result.model.state_dict(), backdoored.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert result.seconds > 0
    fields = {f.name for f in dataclasses.fields(_BASELINES[name].config)}
    assert fields <= set(result.hparams)
    assert set(result.hparams["chosen_by"]) == fields
    assert result.hparams["seed"] == 0


def test_input_model_untouched(
    results: dict[str, DefenseResult], backdoored: nn.Module, snapshot: dict[str, torch.Tensor]
) -> None:
    assert len(results) == 5
    current = backdoored.state_dict()
    assert all(torch.equal(current[k], v) for k, v in snapshot.items())
    assert not backdoored.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in backdoored.modules())
    assert all(p.requires_grad for p in backdoored.parameters())


@pytest.mark.parametrize("name", ["ft", "ftsam", "nc", "fp"])
def test_training_defences_remove_the_patch_backdoor(
    name: str, results: dict[str, DefenseResult], backdoored: nn.Module, digits: dict[str, torch.Tensor]
) -> None:
    _, asr_before = _metrics(backdoored, digits)
    model = results[name].model
    assert model is not None
    ca_after, asr_after = _metrics(model, digits)
    assert not results[name].hparams["diverged"]
    assert asr_after < 0.3 < asr_before  # measured 0.01-0.04 after, 0.98 before
    assert ca_after > 0.7  # measured 0.81-0.93 after, 0.99 before


def test_clp_pairs_every_bn_and_zeroes_pruned_channels(results: dict[str, DefenseResult]) -> None:
    result = results["clp"]
    assert result.model is not None
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert result.hparams["pairs"] == n_bn and result.hparams["unpaired_batchnorms"] == 0
    modules = dict(result.model.named_modules())
    zeroed = sum(int((modules[n].weight == 0).sum()) for n in result.hparams["pruned_per_layer"])
    assert zeroed >= result.hparams["pruned_channels"] > 0


def test_fp_keeps_pruned_channels_at_zero(results: dict[str, DefenseResult]) -> None:
    hp = results["fp"].hparams
    model = results["fp"].model
    assert model is not None and hp["masked_layer"] == "fc"
    assert 0 < hp["pruned_channels"] == len(hp["pruned_channel_indices"])
    assert hp["clean_acc_before_prune"] - hp["clean_acc_after_prune"] <= hp["max_acc_drop"] + 1e-9
    assert torch.all(model.get_classifier().weight[:, hp["pruned_channel_indices"]] == 0)


def test_nc_detects_the_target(results: dict[str, DefenseResult]) -> None:
    hp = results["nc"].hparams
    assert hp["detected_target"] == TARGET
    assert min(hp["mask_l1"], key=hp["mask_l1"].get) == TARGET
    assert hp["unlearned"]


def test_nc_target_override_skips_detection(backdoored: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    images, labels = _budget(digits)
    result = run_baseline("nc", backdoored, images, labels, target=TARGET, steps=20, epochs=1)
    assert result.hparams["detected_target"] == TARGET
    assert result.hparams["anomaly_index"] is None
    assert list(result.hparams["mask_l1"]) == [TARGET]
    with pytest.raises(ClassMismatchError):
        run_baseline("nc", backdoored, images, labels, target=10)


def test_same_seed_same_model(backdoored: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    images, labels = _budget(digits)
    runs = [run_baseline("ft", backdoored, images, labels, seed=s, epochs=2) for s in (3, 3, 4)]
    weights = [r.model.state_dict() for r in runs if r.model is not None]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.parametrize(
    ("arch", "kwargs", "name"),
    [
        ("convnext_atto", {}, "clp"),
        ("convnext_atto", {}, "fp"),
        ("vit_tiny_patch16_224", {"img_size": 32}, "clp"),
        ("vit_tiny_patch16_224", {"img_size": 32}, "fp"),
    ],
)
def test_not_applicable_is_reported(arch: str, kwargs: dict[str, Any], name: str) -> None:
    model = timm.create_model(arch, num_classes=3, **kwargs).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    result = run_baseline(name, model, images, labels, **({"epochs": 1} if name == "fp" else {}))
    assert not result.applicable and result.model is None
    assert result.reason


def test_fine_tuning_runs_on_a_vit() -> None:
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    result = run_baseline("ftsam", model, images, labels, epochs=1)
    assert result.applicable and result.model is not None
    assert list(result.model.state_dict()) == list(model.state_dict())


class _Decoy(nn.Module):
    """The BatchNorm is declared before its convolution and a decoy conv sits between them."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.decoy = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_after_relu = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.bn_after_relu(torch.relu(self.decoy(x))) + y


def test_clp_pairs_by_tracing_not_module_order() -> None:
    assert pair_conv_bn(_Decoy(), torch.randn(1, 3, 8, 8)) == {"bn": "conv"}


def test_sam_steps_with_the_gradient_at_the_perturbed_point() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    sam = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5, adaptive=False)
    (w**2).sum().backward()  # gradient 2w: ascent moves w by rho * w / |w|
    sam.ascend()
    perturbed = torch.tensor([1.0, -2.0]) * (1 + 0.5 / 5**0.5)
    assert torch.allclose(w.detach(), perturbed)
    (w**2).sum().backward()
    sam.descend()
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * 2 * perturbed)


def test_bad_calls_raise(backdoored: nn.Module, digits: dict[str, torch.Tensor]) -> None:
    images, labels = _budget(digits)
    with pytest.raises(UsageError, match="ft"):
        run_baseline("fine-tune", backdoored, images, labels)
    with pytest.raises(UsageError, match="epochs"):
        run_baseline("ft", backdoored, images, labels, epoch=3)
    with pytest.raises(ShapeMismatchError):
        run_baseline("ft", backdoored, images[:, 0], labels)
    with pytest.raises(ShapeMismatchError):
        run_baseline("ft", backdoored, images, labels.int())
    with pytest.raises(ClassMismatchError):
        run_baseline("ft", backdoored, images, labels + 10)
    with pytest.raises(UsageError):
        run_baseline("ft", backdoored, images, labels, bn_mode="frozen")
