"""The repair's second pass: the classifier re-fitted in closed form after an edit upstream of it (issue 13).

An edit of the entry of the last stage changes the features every later layer reads, the target class's too;
the classifier, left as it was, reads the new features with the old weights. The second pass rewrites the
classifier so that, on the edited model's features, it gives the *original* model's outputs of the clean
images, for the clean images (weighted ``w_t`` for the target class, as the repair's preserve term) and for
their triggered twins (the forget pairs stay in: a clean-only re-fit brings the backdoor back)::

    W* = argmin  sum w ||W k'c - W0 k0c||^2 + gamma sum ||W k't - W0 k0c||^2 + lam' ||W - W1||^2
       = (W0 (C0c + gamma C0t) + lam' W1) (Cc + gamma Ctt + lam' I)^-1

with ``k'`` the classifier's keys in the edited model, ``k0c`` its keys of the clean image in the original
model, ``C0c = sum w k0c k'c^T``, ``C0t = sum k0c k't^T``, ``Cc = sum w k'c k'c^T``, ``Ctt = sum k't k't^T``,
and ``W1`` the classifier's current weights. One more pass over D: the edited and the original model each
read the pairs once; with the cross-validation's boundary outputs (``engine/replay.py``: nothing before the
boundary is edited, so both models have the same outputs there) only the layers after it run. The ridge is the re-fit's own (``MethodOptions.refit_lam``, 0.001), smaller than the edit's:
the re-fit has the original outputs as its targets, so the ridge only settles the directions D does not cover
(measured: 0.001 at least as good as the edit's lam on the demo and three bench models, docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from ..constants import UNDERDETERMINED_REFIT_LAM
from ..data import Preprocessor
from ..devices import model_device, stats_device
from .capture import capture_activations
from .edit import PairBatch
from .layers import editable_layer
from .replay import CachedBoundary

__all__ = ["RefitStats", "collect_refit_stats", "refit_ridge", "solve_refit"]


@dataclass
class RefitStats:
    """``(d, d)`` float64 sums of the second pass; ``*_target`` hold the clean target-class rows alone."""

    cc: torch.Tensor
    cc_target: torch.Tensor
    oc: torch.Tensor  # original clean keys x edited clean keys
    oc_target: torch.Tensor
    tt: torch.Tensor
    ot: torch.Tensor  # original clean keys x edited triggered keys


@torch.inference_mode()
def collect_refit_stats(edited: torch.nn.Module, original: torch.nn.Module, layer_name: str,
                        pairs: Iterator[PairBatch], preprocess: Preprocessor, *, target: int,
                        boundary: CachedBoundary | None = None,
                        original_keys: torch.Tensor | None = None) -> RefitStats:
    """One pass of both models over the pairs: the sums :func:`solve_refit` needs for layer ``layer_name``.

    ``boundary``: the cached boundary outputs of these pairs (every augmented copy) before every edited layer;
    both models then run from its outputs. ``None``: both run from the images. ``original_keys``: the original
    model's keys of every clean image of D, ``(len(D), rows per image, key dim)``, read instead of running
    ``original`` (pairs of D itself only: the cross-validation's trials re-fit many times on the same images).
    """
    edited.eval()
    original.eval()
    layer = editable_layer(edited, layer_name)
    dim = layer.key_dim
    device = model_device(edited)
    where = stats_device(device)  # float64 sums: on the device, or on the CPU where it has no float64
    sums = RefitStats(*(torch.zeros(dim, dim, dtype=torch.float64, device=where) for _ in range(6)))
    with ExitStack() as stack:
        now = stack.enter_context(capture_activations(edited, [layer_name], stop=True))
        before = stack.enter_context(capture_activations(original, [layer_name], stop=True))
        if boundary is not None:
            run_edited = stack.enter_context(boundary.plan.installed(edited))
            run_original = stack.enter_context(boundary.plan.installed(original))
        for batch in pairs:
            n = len(batch.labels)
            known = original_keys is not None
            if known and batch.copy != 0:
                raise ValueError("original_keys hold the keys of D itself, not of its augmented copies")
            if boundary is not None:
                rows = boundary.rows(batch)
                now.call(run_edited, rows)
                if not known:
                    before.call(run_original, rows[:n])
            else:
                clean = preprocess(batch.clean).to(device)
                now.run(torch.cat([clean, preprocess(batch.triggered).to(device)]))
                if not known:
                    before.run(clean)
            inputs = now[layer_name].input.to(where, torch.float64)
            kc, kt = layer.keys(inputs[:n]), layer.keys(inputs[n:])
            if known:
                k0 = original_keys[torch.as_tensor(batch.source)].reshape(-1, dim).to(where, torch.float64)
            else:
                k0 = layer.keys(before[layer_name].input.to(where, torch.float64))
            rows = torch.as_tensor(np.repeat(batch.labels == target, kc.shape[0] // n), device=where)
            sums.cc += kc.T @ kc
            sums.oc += k0.T @ kc
            sums.tt += kt.T @ kt
            sums.ot += k0.T @ kt
            if bool(rows.any()):
                sums.cc_target += kc[rows].T @ kc[rows]
                sums.oc_target += k0[rows].T @ kc[rows]
    return sums


def refit_ridge(lam: float, key_dim: int, rows: int) -> float:
    """The re-fit's ridge (scale-free): ``lam`` where its ``rows`` outnumber the classifier's ``key_dim``, at
    least :data:`UNDERDETERMINED_REFIT_LAM` where they do not.

    Fewer rows than key dimensions and a small ridge let the re-fit interpolate its rows: the augmented copies'
    small variations get large weights, and clean images outside D pay (a pretrained EfficientNet-Lite0, 1280
    keys and 1000 rows: clean accuracy 71.8% -> 48.6% at 0.001, 69.6% at 0.1; docs/METHOD.md).
    """
    return lam if rows >= key_dim else max(lam, UNDERDETERMINED_REFIT_LAM)


def solve_refit(w0: torch.Tensor, w1: torch.Tensor, stats: RefitStats, *, lam: float, gamma: float,
                target_weight: float = 1.0) -> torch.Tensor:
    """The re-fitted weight matrix (bias folded in), in float64 by a linear solve; ``lam`` scale-free as in the edit."""
    cc = stats.cc + (target_weight - 1.0) * stats.cc_target
    oc = stats.oc + (target_weight - 1.0) * stats.oc_target
    a = cc + gamma * stats.tt
    ridge = lam * float(torch.diagonal(a).mean().clamp_min(1e-12))
    a = a + ridge * torch.eye(a.shape[0], dtype=torch.float64)
    b = w0 @ (oc + gamma * stats.ot) + ridge * w1
    return torch.linalg.solve(a, b.T).T  # W a = b with a symmetric
