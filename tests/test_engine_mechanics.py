"""Engine mechanics on every listed architecture (random weights): hooks, which weights change, reload."""

from __future__ import annotations

import pytest
import timm
import torch

from agme_hub.lab.backdoor import create_classifier
from agme_hub.hub.checkpoint import save_model
from agme_hub.data import Preprocessor, load_images
from agme_hub.engine.edit import GramStats, solve_edit
from agme_hub.engine.clean import clean, inspect_layers
from agme_hub.errors import LayerNotFoundError, UnsupportedArchitectureError

ARCHS = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "tf_efficientnet_lite0", "mobilenetv3_small_100",
         "densenet121", "vgg11_bn"]
# Wide keys make the cross-validation slow on CPU (per fold a Gram matrix and a solve as wide as the keys): VGG's
# 4096-wide head took 229 s of CI, resnet18's 2304-wide layer4.0.conv1 33 s (21 of its 23 s here). They are edited
# with layers and lam given: VGG's classifier; for resnet18 what its cross-validation chooses on these images (the
# entry of the last stage, lam 0.01; at lam 0.1 the weights of this random network came out unchanged).
# The cross-validation's mechanics are checked on the other five architectures.
GIVEN = {"vgg11_bn": (["head.fc"], 0.1), "resnet18": (["layer4.0.conv1", "layer4.0.downsample.0"], 0.01)}


@pytest.fixture(scope="module")
def cifar():
    return load_images("cifar10-samples")  # 20 real CIFAR-10 images, 32x32 RGB


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier(arch, num_classes=10, in_chans=3, img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3).eval()


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_mechanics(arch, cifar, tmp_path):
    model = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers, lam = GIVEN.get(arch, (None, None))
    result = clean(model, cifar, trigger="patch:size=4,pos=bottom-right", target=0, augment_copies=1, seed=0, lam=lam,
                   layers=layers)
    assert _hooks(model) == 0 and _hooks(result.model) == 0
    # the original is untouched; the edit keeps every parameter name and shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = result.model.state_dict()
    assert list(after) == list(before) and all(after[k].shape == before[k].shape for k in before)
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    # the edited layers, and the classifier when the repair re-fitted it (an edit upstream of it)
    assert changed and changed <= set(result.layers) | {result.refitted}, (changed, result.layers, result.refitted)
    assert result.refitted is None or result.refitted not in result.layers
    if lam is None:
        assert result.selection is not None and result.layers == result.selection.layers
    # the saved folder reloads in timm with identical outputs
    save_model(result.model, tmp_path / "out", label_names=cifar.label_names)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = Preprocessor.from_model(model)(cifar.images[:4])
    with torch.inference_mode():
        assert torch.allclose(reloaded(x), result.model(x), atol=1e-5)


@pytest.mark.parametrize("arch,expected", [
    ("resnet18", {"layer4.0.conv1", "layer4.0.downsample.0"}), ("convnext_atto", {"stages.3.downsample.1"}),
    ("vit_tiny_patch16_224", {"blocks.11.attn.qkv", "blocks.11.mlp.fc1"}),
])
def test_candidates_are_the_entry_of_the_last_stage(arch, expected):
    groups = inspect_layers(_model(arch)).groups
    assert expected <= set(groups["entry"]) and len(groups["classifier"]) == 1


def test_a_plain_vit_also_offers_the_entry_of_its_last_blocks():
    """The residual stream carries the trigger past the last block's edit: a ViT's ``blocks`` group chains the
    entry layers of its last ``DEEP_ENTRY_BLOCKS`` blocks. Networks whose stages change shape have none."""
    groups = inspect_layers(_model("vit_tiny_patch16_224")).groups
    assert list(groups) == ["entry", "blocks", "classifier"]
    assert groups["blocks"] == [f"blocks.{b}.{layer}" for b in (9, 10, 11)
                                for layer in ("attn.qkv", "attn.proj", "mlp.fc1")]
    assert groups["blocks"][-3:] == groups["entry"]
    assert "blocks" not in inspect_layers(_model("resnet18")).groups


def test_named_layers_and_refusals(cifar):
    model = _model("mobilenetv3_small_100")
    result = clean(model, cifar, trigger="badnets-white-br", target=0, lam=0.1, layers=["classifier"],
                   augment_copies=0)
    assert result.layers == ["classifier"] and result.selection is None
    with pytest.raises(UnsupportedArchitectureError, match="blocks.0.0.conv_dw.*depthwise"):
        clean(model, cifar, trigger="badnets-white-br", target=0, lam=0.1, layers=["blocks.0.0.conv_dw"])
    with pytest.raises(UnsupportedArchitectureError, match="BatchNorm"):
        clean(model, cifar, trigger="badnets-white-br", target=0, lam=0.1, layers=["blocks.0.0.bn1"])
    with pytest.raises(LayerNotFoundError, match="did you mean"):
        clean(model, cifar, trigger="badnets-white-br", target=0, lam=0.1, layers=["clasifier"])


def test_model_without_editable_classifier_is_refused(cifar):
    model = _model("resnet18")
    model.reset_classifier(0)  # no head: nothing to read the representation
    with pytest.raises(UnsupportedArchitectureError, match="no linear classifier"):
        inspect_layers(model)


def test_closed_form_minimises_the_objective():
    rng = torch.Generator().manual_seed(0)
    d, n = 6, 40
    w0 = torch.randn(3, d, generator=rng, dtype=torch.float64)
    kc = torch.randn(n, d, generator=rng, dtype=torch.float64)
    kt = kc + 0.5 * torch.randn(n, d, generator=rng, dtype=torch.float64)
    stats = GramStats.zeros(d)
    stats.add(kc, kt, torch.zeros(n, dtype=torch.bool))
    lam, gamma = 0.1, 2.0

    def objective(w):
        ridge = lam * float(torch.diagonal(kc.T @ kc + gamma * kt.T @ kt).mean())
        return (((w - w0) @ kc.T) ** 2).sum() + gamma * ((w @ kt.T - w0 @ kc.T) ** 2).sum() + ridge * ((w - w0) ** 2).sum()

    w = solve_edit(w0, stats, lam=lam, gamma=gamma)
    for _ in range(20):
        assert objective(w) <= objective(w + 1e-3 * torch.randn(3, d, generator=rng, dtype=torch.float64))
    # scale-free: scaling every key leaves the solution unchanged
    scaled = GramStats.zeros(d)
    scaled.add(10 * kc, 10 * kt, torch.zeros(n, dtype=torch.bool))
    assert torch.allclose(solve_edit(w0, scaled, lam=lam, gamma=gamma), w, atol=1e-8)


def test_clean_is_deterministic(cifar):
    model = _model("resnet18")
    kwargs = dict(trigger="blend:alpha=0.2", target=3, augment_copies=2, seed=1, lam=0.1, layers=["layer4.0.conv1", "fc"])
    a, b = clean(model, cifar, **kwargs), clean(model, cifar, **kwargs)
    assert a.layers == b.layers and a.lam == b.lam
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_the_bar_rule_puts_forgetting_first():
    """``selection="bar"``: among settings whose held-out ASR is within D's natural confusion + 2 pt, the most
    CA + TA/2; the score would take a better-kept setting that leaves more of the backdoor."""
    from agme_hub.engine.select import _pick, _score

    rows = [dict(ca=ca, ta=ta, asr=asr, score=_score(ca, ta, asr), name=name)
            for name, ca, ta, asr in (("kept", 0.82, 1.0, 0.08), ("forgot", 0.78, 0.6, 0.03), ("both", 0.79, 0.7, 0.04))]
    assert _pick(rows, "score", natural=0.02)["name"] == "kept"
    assert _pick(rows, "bar", natural=0.02)["name"] == "both"
    assert _pick(rows, "bar", natural=0.0)["name"] == "forgot"  # none within the bar: the lowest ASR


def test_the_soft_rule_sees_margins_the_counts_miss():
    """``selection="soft"`` counts each held-out image by its predicted probability of the class counted: two
    settings with the same counts (every clean image right, no triggered image sent to the target) differ where one
    of them pulled the triggered images toward the target; the counts tie and keep the first row."""
    import numpy as np

    from agme_hub.engine.select import _held_out_metrics, _pick

    labels = np.array([0, 0, 1, 1, 2, 2])  # target 0: two target images, four others
    clean_pred, clean_prob = labels.copy(), np.full(6, 0.9, np.float32)
    probe_pred = labels[None].copy()  # the triggered images keep their class
    rows = []
    for name, pull in (("pulled", 0.45), ("pushed", 0.05)):  # their probability of the target
        metrics = _held_out_metrics(clean_pred, clean_prob, probe_pred, np.full((1, 6), pull, np.float32), labels,
                                    target=0)
        assert metrics["ca"] == metrics["ta"] == 1.0 and metrics["asr"] == 0.0
        assert metrics["ta_p"] == pytest.approx(0.9) and metrics["asr_p"] == pytest.approx(pull)
        rows.append(dict(metrics, name=name))
    assert _pick(rows, "score", natural=0.0)["name"] == "pulled"  # a tie on the counts: the first row
    assert _pick(rows, "soft", natural=0.0)["name"] == "pushed"


def test_held_out_probabilities_are_those_of_the_class_counted():
    """The trials' predictions give the argmax and the softmax probability of one class per row (the true class) or
    of one class for all (the target), as the ``soft`` rule reads them."""
    import numpy as np
    import torch

    from agme_hub.engine.select import _outcomes

    logits = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    probs = torch.softmax(torch.cat(logits), 1).numpy()
    pred, of_label = _outcomes(logits, np.array([0, 2, 2]))
    assert pred.tolist() == [0, 1, 2]
    assert np.allclose(of_label, [probs[0, 0], probs[1, 2], probs[2, 2]])
    assert np.allclose(_outcomes(logits, 1)[1], probs[:, 1])


def test_clean_offers_the_target_weight_grid(cifar):
    """Every weight of ``target_weight_grid`` is a row of the cross-validation's table; the edit ships with the
    chosen one, and the result reports it."""
    result = clean(_model("convnext_atto"), cifar, trigger="blend:alpha=0.2", target=3, augment_copies=1, seed=0,
                   layers=["head.fc"], lam_grid=(0.1,), target_weight_grid=(4.0, 16.0), selection="bar")
    assert {row["target_weight"] for row in result.selection.table} == {4.0, 16.0}
    assert result.target_weight == result.selection.target_weight in (4.0, 16.0)
    assert result.selection.rule == "bar"


@pytest.mark.parametrize("bad", [dict(selection="best"), dict(target_weight_grid=(4.0, 0.0)),
                                 dict(target_weight_grid=())])
def test_bad_selection_options_are_refused(bad):
    from agme_hub.errors import UsageError
    from agme_hub.options import MethodOptions

    with pytest.raises(UsageError):
        MethodOptions(**bad)


def test_held_out_surrogates_score_the_trials_and_are_never_forgotten(cifar):
    """``scored`` triggers (no-BDK's held-out surrogates) are captured like the forgotten ones, but the table's ASR is
    theirs alone: a scored copy of the forgotten trigger scores as it does; a trigger that turns every image into
    one and the same image gives every non-target row one prediction, so each trial's ASR is 0 or 1."""
    import numpy as np

    from agme_hub.engine.select import _cross_validate
    from agme_hub.triggers import parse_trigger

    class OneImage:  # every image becomes the first image of D
        applies_to_any_image = True

        def apply(self, images: np.ndarray) -> np.ndarray:
            return np.broadcast_to(cifar.images[:1], images.shape).copy()

    model = _model("convnext_atto")
    preprocess = Preprocessor.from_model(model)
    blend = parse_trigger("blend:alpha=0.2")
    common = dict(forget={"given": (blend,)}, target=3, preprocess=preprocess, groups={"head": ["head.fc"]},
                  lams=(0.01, 1.0), gamma=1.0, target_weight=4.0, copies=1, folds=2, seed=0, flip=False)
    plain = _cross_validate(model, cifar, **common)[0].table
    same = _cross_validate(model, cifar, **common, scored=(parse_trigger("blend:alpha=0.2"),))[0].table
    fixed = _cross_validate(model, cifar, **common, scored=(OneImage(),))[0]
    assert [row["asr"] for row in same] == [row["asr"] for row in plain]
    assert {row["asr"] for row in fixed.table} <= {0.0, 1.0}
    assert fixed.forget == "given" and {row["forget"] for row in fixed.table} == {"given"}
