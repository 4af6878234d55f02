"""CLP: channel Lipschitzness-based pruning (Zheng et al., ECCV 2022), data-free.

For every convolution whose output is normalised by a BatchNorm, the upper bound of each output
channel's Lipschitz constant is ``sigma_max(W_k) * |gamma_k / sqrt(var_k + eps)|``; channels whose
bound exceeds ``mean + u * std`` of their layer are pruned by zeroing the BatchNorm's weight and
bias (the parameter names stay the same, so the model saves like the original).

The Conv->BN pairs come from tracing one forward pass: a BatchNorm is paired with a convolution only
when the tensor it receives *is* that convolution's output. Module order is never used: it is how
the reference code mispairs layers on PreAct-ResNets (CLP issues #2/#3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import UsageError
from ._common import BaselineConfig, Outcome, register_baseline

__all__ = ["CLPConfig", "channel_lipschitz_prune", "pair_conv_bn", "channel_lipschitz_bounds"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLPConfig(BaselineConfig):
    """CLP's single threshold."""

    u: float = 3.0

    SOURCES: ClassVar[dict[str, str]] = {"u": "fixed default: the CLP paper's u = 3 (data-free, nothing to tune on)"}

    def __post_init__(self) -> None:
        if self.u < 0:
            raise UsageError(f"u must be >= 0, got {self.u}.")


@contextmanager
def _trace_pairs(model: nn.Module, pairs: dict[str, str]) -> Iterator[None]:
    """Record ``bn name -> conv name`` while the model runs; every hook is removed on exit."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv name, output kept alive)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_conv(module: nn.Module, _inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            # Keeping the tensor alive stops Python from reusing its id for a later tensor.
            produced[id(output)] = (names[module], output)

    def on_bn(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in produced:
            conv_name, tensor = produced[id(inputs[0])]
            if tensor is inputs[0]:
                pairs.setdefault(names[module], conv_name)

    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(on_conv))
            elif isinstance(module, nn.BatchNorm2d):
                handles.append(module.register_forward_pre_hook(on_bn))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        produced.clear()


def pair_conv_bn(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Map each BatchNorm2d to the Conv2d whose output it normalises, found by tracing one forward pass.

    Args:
        model: any module; run once in eval mode on ``example``.
        example: one input batch (a single image is enough).

    Returns:
        ``{bn_name: conv_name}`` for every BatchNorm fed directly by a convolution's output tensor.
    """
    pairs: dict[str, str] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _trace_pairs(model, pairs):
            model(example)
    finally:
        model.train(was_training)
    return pairs


def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant through conv then BN (UCLC), shape (C_out,)."""
    weight = conv.weight.detach().float()
    per_channel = weight.reshape(weight.shape[0], weight.shape[1], -1)  # (C_out, C_in/groups, kh*kw)
    sigma = torch.linalg.matrix_norm(per_channel, ord=2)
    var = bn.running_var.detach().float() if bn.running_var is not None else torch.ones_like(sigma)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(sigma)
    bound: torch.Tensor = sigma * (gamma / torch.sqrt(var + bn.eps)).abs()
    return bound


@register_baseline("clp", config=CLPConfig)
def channel_lipschitz_prune(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: CLPConfig, *, generator: torch.Generator
) -> Outcome:
    """Prune channels with an outlying Lipschitz bound; the images serve only to trace Conv->BN pairs.

    Args:
        model: the copy to defend, changed in place.
        images: only ``images[:1]`` is used, to trace the graph (CLP itself is data-free).
        labels: unused.
        config: the threshold ``u``.
        generator: unused (CLP is deterministic).
    """
    del labels, generator
    pairs = pair_conv_bn(model, images[:1])
    modules = dict(model.named_modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in modules.values())
    if not pairs:
        found = f"none of its {n_bn} BatchNorm2d layers reads" if n_bn else "it has no BatchNorm2d layer after"
        return Outcome.not_applicable(
            f"CLP needs convolutions followed by BatchNorm, and {found} a convolution's output "
            "(e.g. ConvNeXt and ViT use LayerNorm).",
            pairs=0,
        )
    pruned: dict[str, int] = {}
    total = 0
    for bn_name, conv_name in pairs.items():
        bn, conv = modules[bn_name], modules[conv_name]
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d) or bn.weight is None:
            continue  # a BatchNorm without affine weights has nothing to zero
        uclc = channel_lipschitz_bounds(conv, bn)
        if uclc.numel() < 2:
            continue
        index = torch.nonzero(uclc > uclc.mean() + config.u * uclc.std()).flatten()
        if index.numel():
            with torch.no_grad():
                bn.weight[index] = 0.0
                if bn.bias is not None:
                    bn.bias[index] = 0.0
            pruned[bn_name] = int(index.numel())
            total += int(index.numel())
    total_channels = sum(int(getattr(modules[b], "num_features", 0)) for b in pairs)
    _logger.info("CLP pruned %d channels over %d Conv->BN pairs", total, len(pairs))
    return Outcome(
        model=model,
        chosen={
            "pairs": len(pairs), "unpaired_batchnorms": n_bn - len(pairs), "pruned_channels": total,
            "pruned_fraction": total / max(1, total_channels), "pruned_per_layer": pruned,
        },
    )
