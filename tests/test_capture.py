"""The hooks context manager: captures inputs, clones, stops early, and always removes its hooks."""

from __future__ import annotations

import pytest
import timm
import torch

from agme_hub.engine.capture import capture_activations, match_layer_names
from agme_hub.errors import LayerNotFoundError


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1).eval()


def test_captures_input_of_classifier(resnet):
    x = torch.randn(3, 1, 32, 32)
    with capture_activations(resnet, ["fc"]) as trace:
        logits = trace.run(x)
    features = resnet.forward_head(resnet.forward_features(x), pre_logits=True)
    assert torch.allclose(trace["fc"].input, features, atol=1e-6)
    assert logits.shape == (3, 10) and _hooks(resnet) == 0


def test_clones_against_in_place_changes(resnet):
    x = torch.randn(2, 1, 32, 32)
    with capture_activations(resnet, ["layer1.0.bn2"], retain_input=False, retain_output=True) as trace:
        trace.run(x)
    # BasicBlock adds the shortcut in place after bn2 returns: without a clone the capture would change
    bn_out = resnet.layer1[0].bn2(resnet.layer1[0].conv2(resnet.layer1[0].act1(resnet.layer1[0].bn1(
        resnet.layer1[0].conv1(resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(x)))))))))
    assert torch.allclose(trace["layer1.0.bn2"].output, bn_out, atol=1e-5)


def test_stop_forward_ends_early_and_cleans_up(resnet):
    calls = []
    handle = resnet.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        with capture_activations(resnet, ["layer2"], stop=True) as trace:
            assert trace.run(torch.randn(1, 1, 32, 32)) is None
        assert trace["layer2"].input is not None and calls == []
    finally:
        handle.remove()
    assert _hooks(resnet) == 0


def test_hooks_removed_on_error(resnet):
    with pytest.raises(RuntimeError):
        with capture_activations(resnet, ["fc", "layer4"]):
            resnet(torch.randn(1, 5, 32, 32))  # wrong channel count
    assert _hooks(resnet) == 0
    # a bad name registered after good ones: the good ones must not leak
    with pytest.raises(LayerNotFoundError, match="did you mean"):
        with capture_activations(resnet, ["fc", "layer4", "layr4"]):
            pass
    assert _hooks(resnet) == 0


def test_globs_expand_in_model_order(resnet):
    names = match_layer_names(resnet, ["layer4.0.conv*", "fc"])
    assert names == ["layer4.0.conv1", "layer4.0.conv2", "fc"]
    with pytest.raises(LayerNotFoundError):
        match_layer_names(resnet, ["nothing.*"])
