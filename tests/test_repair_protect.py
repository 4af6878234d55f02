"""The repair's null-space constraint and the neck candidates (issue 13): mechanics, no training."""

from __future__ import annotations

import torch

from agme_hub.lab.backdoor import create_classifier
from agme_hub.engine.edit import GramStats, solve_edit
from agme_hub.engine import inspect_layers


def _stats(d: int = 8, n: int = 60) -> tuple[torch.Tensor, GramStats, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, d, generator=rng, dtype=torch.float64)
    # target-class keys live in a 2-d subspace; the trigger shifts every key along a direction partly in it
    basis = torch.linalg.qr(torch.randn(d, d, generator=rng, dtype=torch.float64))[0]
    is_target = torch.arange(n) < n // 4
    kc = torch.randn(n, d, generator=rng, dtype=torch.float64)
    kc[is_target] = torch.randn(int(is_target.sum()), 2, generator=rng, dtype=torch.float64) @ basis[:, :2].T
    trigger = basis[:, 0] + basis[:, 3]
    kt = kc + trigger
    stats = GramStats.zeros(d)
    stats.add(kc, kt, is_target)
    return w0, stats, basis[:, :2]


def test_protected_update_leaves_the_target_keys_alone():
    w0, stats, target_span = _stats()
    free = solve_edit(w0, stats, lam=0.01, gamma=1.0)
    protected = solve_edit(w0, stats, lam=0.01, gamma=1.0, protect=0.999)
    # unconstrained, the edit changes what target-class keys give; protected, it cannot
    assert ((free - w0) @ target_span).abs().max() > 1e-2
    assert ((protected - w0) @ target_span).abs().max() < 1e-8
    # and it still edits something (the directions the target class does not use)
    assert (protected - w0).abs().max() > 1e-2


def test_protected_update_is_the_best_one_in_the_free_directions():
    w0, stats, _ = _stats()
    lam, gamma = 0.01, 1.0
    a = stats.cc + gamma * stats.tt
    ridge = lam * float(torch.diagonal(a).mean())

    def objective(w):
        delta = w - w0
        return (torch.trace(delta @ stats.cc @ delta.T) + ridge * (delta ** 2).sum()
                + gamma * torch.trace(w @ stats.tt @ w.T - 2 * w0 @ stats.ct @ w.T))

    w = solve_edit(w0, stats, lam=lam, gamma=gamma, protect=0.999)
    energy, directions = torch.linalg.eigh(stats.cc_target)
    free = directions[:, energy < 1e-9 * energy.max()]  # the null space of the target keys
    rng = torch.Generator().manual_seed(1)
    for _ in range(20):
        step = 1e-3 * torch.randn(3, free.shape[1], generator=rng, dtype=torch.float64) @ free.T
        assert objective(w) <= objective(w + step)


def test_no_target_rows_means_nothing_is_protected():
    w0, stats, _ = _stats()
    stats.cc_target.zero_()
    assert torch.allclose(solve_edit(w0, stats, lam=0.01, gamma=1.0, protect=0.9),
                          solve_edit(w0, stats, lam=0.01, gamma=1.0), atol=1e-8)


def test_neck_candidates_are_the_maps_between_the_last_stage_and_the_classifier():
    def groups(arch: str, **model_args):
        torch.manual_seed(0)
        model = create_classifier(arch, num_classes=10, in_chans=1, img_size=32, mean=(0.5,), std=(0.5,),
                                  model_args=model_args)
        return inspect_layers(model.eval()).groups

    assert groups("mobilenetv3_small_100")["neck"] == ["conv_head", "classifier"]
    assert groups("efficientnet_b0")["neck"] == ["conv_head", "classifier"]
    assert "neck" not in groups("resnet10t", channels=[16, 32, 64, 128])
    assert "neck" not in groups("convnext_atto", dims=[24, 48, 96, 192], depths=[1, 1, 2, 1])
