"""Which modules the engine can edit, and how each one's keys and weight matrix are read.

An editable layer is a linear map ``y = W k + b``: a ``nn.Linear`` (keys are its input vectors, one
per token for transformers) or a ``nn.Conv2d`` with ``groups == 1`` (keys are its unfolded input
patches, ``C_in * kh * kw`` values at every output position). Anything else is refused by name.

Candidates come from the model itself: the classifier, the linear maps that read the whole
representation at the entry of the last stage (found from timm's ``feature_info``, or for transformers and
plain torch modules from a traced forward pass, see :mod:`agme_hub.engine.tracing`), and, where the network
has them, the maps between the last stage and the classifier (the "neck", e.g. MobileNetV3's ``conv_head``)
chained with the classifier. A plain ViT (blocks of one shape) also offers the entry maps of its last
``constants.DEEP_ENTRY_BLOCKS`` blocks as one chain (the "blocks" group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import constants  # read at call time: a test lowers MAX_KEY_DIM to reach wide layers on small models
from ..devices import stats_device
from ..errors import UnsupportedArchitectureError
from .capture import capture_activations, get_module, match_layer_names
from .tracing import traced_head, traced_stages

__all__ = ["key_block", "max_key_dim", "EditableLayer", "editable_layer", "find_candidates", "Candidates",
           "resolve_layers", "classifier_name"]


@dataclass(frozen=True)
class EditableLayer:
    """A module seen as a matrix ``W`` of shape ``(out, d [+1 for the bias])`` acting on keys."""

    name: str
    module: torch.nn.Module
    # Padding the module applies inside its forward (timm's Conv2dSame, TF-style "same"), applied to its
    # input before unfolding; None when the module's own ``padding`` says it all.
    pad: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def key_dim(self) -> int:
        return self.module.weight[0].numel() + int(self.has_bias)

    def weight_matrix(self) -> torch.Tensor:
        """``W`` (bias as the last column) in float64, where the statistics live (the CPU for MPS)."""
        where = stats_device(self.module.weight.device)
        w = self.module.weight.detach().reshape(self.module.weight.shape[0], -1).to(where).double()
        if self.has_bias:
            w = torch.cat([w, self.module.bias.detach().to(where).double()[:, None]], dim=1)
        return w

    @torch.no_grad()
    def set_weight_matrix(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        cols = weight[0].numel()
        # cast before the move: MPS takes no float64
        weight.copy_(matrix[:, :cols].reshape(weight.shape).to(weight.dtype).to(weight.device))
        if self.has_bias:
            self.module.bias.copy_(matrix[:, cols].to(self.module.bias.dtype).to(self.module.bias.device))

    def keys(self, inputs: torch.Tensor) -> torch.Tensor:
        """Rows of keys ``(M, key_dim)`` from what the layer received, in a fixed per-sample order.

        Row ``i`` of a clean batch and row ``i`` of its triggered twin are the same image and position.
        """
        module = self.module
        if isinstance(module, torch.nn.Linear):
            rows = inputs.reshape(-1, inputs.shape[-1])
        else:
            x = inputs if self.pad is None else self.pad(inputs)
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        rows = rows.double()
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def rows_per_sample(self, inputs: torch.Tensor) -> int:
        return self.keys(inputs[:1]).shape[0]


def editable_layer(model: torch.nn.Module, name: str) -> EditableLayer:
    """Wrap module ``name`` as an editable layer, or refuse it with a message that names it."""
    module = get_module(model, name)
    kind = type(module).__name__
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not _fits(_key_dim(module)):
        widest = max_key_dim()
        fitting = [n for n, m in model.named_modules() if n and _is_editable(m)][-4:]
        hint = f"; layers that fit: {', '.join(fitting)}" if fitting else ""
        raise UnsupportedArchitectureError(f"layer {name} reads {_key_dim(module)} values per key; even solved in "
                                           f"blocks the edit's statistics would not fit (limit {widest}){hint}")
    if isinstance(module, torch.nn.Linear):
        return EditableLayer(name, module)
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedArchitectureError(f"layer {name} ({kind}, groups={module.groups}) is a grouped/depthwise "
                                               "convolution; agme edits only dense linear maps")
        if module.padding_mode != "zeros":
            raise UnsupportedArchitectureError(f"layer {name} pads with {module.padding_mode!r}; agme needs zero padding")
        if type(module).__name__ == "Conv2dSame":  # timm's TF-style dynamic padding happens inside forward
            from timm.layers import pad_same

            return EditableLayer(name, module,
                                 pad=lambda x, m=module: pad_same(x, m.weight.shape[-2:], m.stride, m.dilation))
        if isinstance(module.padding, str):
            raise UnsupportedArchitectureError(f"layer {name} uses padding={module.padding!r}; agme needs explicit padding")
        return EditableLayer(name, module)
    raise UnsupportedArchitectureError(f"layer {name} is a {kind}; agme edits nn.Linear and dense nn.Conv2d layers only")


def _key_dim(module: torch.nn.Module) -> int:
    return module.weight[0].numel() + int(getattr(module, "bias", None) is not None)


def key_block(dim: int) -> int | None:
    """Keys per diagonal block of the solve: ``None`` (solved whole) up to ``MAX_KEY_DIM``, else
    ``MAX_KEY_DIM^2 // dim``, so that the statistics of a wider layer take no more memory than a layer at the cap."""
    if dim <= constants.MAX_KEY_DIM:
        return None
    return constants.MAX_KEY_DIM ** 2 // dim


def max_key_dim() -> int:
    """The widest key the engine edits: where the block would fall below ``MIN_KEY_BLOCK``."""
    return constants.MAX_KEY_DIM ** 2 // constants.MIN_KEY_BLOCK


def _fits(dim: int) -> bool:
    return dim <= max_key_dim()


def _is_editable(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return _fits(_key_dim(module))
    return (isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and _fits(_key_dim(module)))


def _is_candidate(module: torch.nn.Module) -> bool:
    # Chosen automatically only up to the cap: the cross-validation keeps a layer's Gram matrices per fold, and a
    # wider layer (solved blockwise) would hold cap^2 values per matrix per fold (GBs). Name it to edit it anyway.
    return _is_editable(module) and _key_dim(module) <= constants.MAX_KEY_DIM


def classifier_name(model: torch.nn.Module, sample: torch.Tensor | None = None) -> str:
    """Dotted name of the model's classifier (``get_classifier()``), which must be a Linear or a conv.

    A model without ``get_classifier`` (transformers, plain torch) is traced on ``sample``: the classifier is
    the last editable layer whose output has the logits' width.
    """
    get = getattr(model, "get_classifier", None)
    if get is None and sample is not None:
        traced = traced_head(model, sample)
        if traced is not None and _is_editable(get_module(model, traced)):
            return traced
    head = get() if get is not None else None
    if isinstance(head, (tuple, list)):  # distilled models return (head, head_dist)
        head = head[0]
    for name, module in model.named_modules():
        if module is head and _is_editable(module):
            return name
    raise UnsupportedArchitectureError(f"{type(model).__name__} has no linear classifier that agme can edit "
                                       f"(get_classifier() gives {type(head).__name__})")


@dataclass(frozen=True)
class Candidates:
    """Layer groups the engine may edit, each group edited together: ``{"classifier": [...], "entry": [...]}``."""

    groups: dict[str, list[str]]
    boundary: str | None  # the feature_info module whose output the entry layers read

    def describe(self) -> list[tuple[str, str]]:
        return [(group, ", ".join(names)) for group, names in self.groups.items()]


def _execution_order(model: torch.nn.Module, sample: torch.Tensor,
                     boundary_names: set[str] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, input shape) of every leaf module, in the order a forward pass runs them."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor):
                order.append((name, tuple(inputs[0].shape[1:])))
        return fn

    if boundary_names is None:
        boundary_names = {f["module"] for f in getattr(model, "feature_info", [])}
    try:
        for name, module in model.named_modules():
            if name and (not list(module.children()) or name in boundary_names):
                handles.append(module.register_forward_hook(hook(name)))
        with torch.inference_mode():
            model.eval()(sample)
    finally:
        for handle in reversed(handles):
            handle.remove()
    return order


def _channels(shape: tuple[int, ...]) -> int:
    """Feature width of an activation without its batch dim: C of (C, H, W), D of (T, D) or (D,)."""
    return shape[0] if len(shape) == 3 else shape[-1]


def find_candidates(model: torch.nn.Module, sample: torch.Tensor) -> Candidates:
    """The classifier, and the editable layers that read the output of the second-to-last stage.

    ``sample`` is one preprocessed input batch (shapes only matter). The boundary is the second-to-last
    entry of ``feature_info`` whose output differs from the last one's; the entry layers are the
    editable modules after it whose input has the boundary's feature width: the full representation,
    possibly normalised or pooled (ResNet-D shortcuts), but not yet transformed.
    """
    groups: dict[str, list[str]] = {}
    boundary = None
    info = [f["module"] for f in getattr(model, "feature_info", [])]
    if len(info) < 2 and not hasattr(model, "feature_info"):  # not timm: the stages come from a traced pass
        info = traced_stages(model, sample)
    head = classifier_name(model, sample)
    if len(info) >= 2:
        order = _execution_order(model, sample, set(info))
        outputs: dict[str, tuple[int, ...]] = {}
        with torch.inference_mode():
            with capture_activations(model, info, retain_input=False, retain_output=True) as trace:
                trace.run(sample)
            for name in info:
                out = trace[name].output
                if out is not None:
                    outputs[name] = tuple(out.shape[1:])
        deep = None
        for name in reversed(info[:-1]):
            if name in outputs and outputs[name] != outputs.get(info[-1]):
                boundary = name
                break
        else:  # every stage has the same shape (plain ViTs): the last block is the last stage
            boundary = info[-2] if info[-2] in outputs else None
            # and the entry layers of the last few blocks, edited as one chain (docs/METHOD.md, stop 20)
            blocks = constants.DEEP_ENTRY_BLOCKS
            deep = info[-1 - blocks] if len(info) > blocks else None
        for group, start in (("entry", boundary), ("blocks", deep)):
            if start is not None and start in outputs:
                layers = _entry_layers(model, order, start, _channels(outputs[start]), head)
                if layers and layers != groups.get("entry"):
                    groups[group] = layers
        neck = _neck_layers(model, order, info[-1], head)
        if neck:  # edited as a chain with the classifier: each alone leaves the backdoor (docs/METHOD.md)
            groups["neck"] = neck + [head]
    elif not hasattr(model, "feature_info"):  # no stages at all (layers in one nn.Sequential): the layer before the head
        order = _execution_order(model, sample, set())
        before = [n for n, _ in order if n != head and _is_candidate(get_module(model, n))]
        if before:
            groups["entry"] = [before[-1]]
    groups["classifier"] = [head]
    return Candidates(groups, boundary)


def _entry_layers(model: torch.nn.Module, order: list[tuple[str, tuple[int, ...]]], start: str, channels: int,
                  head: str) -> list[str]:
    """The editable modules after stage ``start`` whose input has its feature width ``channels`` (not the head)."""
    position = max(i for i, (n, _) in enumerate(order) if n == start or n.startswith(start + "."))
    layers = [n for n, s in order[position + 1:]
              if s and _channels(s) == channels and _is_candidate(get_module(model, n)) and n != head]
    return list(dict.fromkeys(layers))


def _neck_layers(model: torch.nn.Module, order: list[tuple[str, tuple[int, ...]]], last_stage: str,
                 head: str) -> list[str]:
    """The editable maps between the last stage's output and the classifier (e.g. timm's ``conv_head``).

    MobileNetV3 pools the last stage and sends it through a 1x1 conv and a hard-swish before the classifier,
    so the classifier reads a nonlinear transform of what that conv gives (docs/METHOD.md, issue 13).
    ResNets, ConvNeXt and ViTs have none: their head is norm/pool + classifier.
    """
    positions = [i for i, (n, _) in enumerate(order) if n == last_stage or n.startswith(last_stage + ".")]
    if not positions:
        return []
    neck = [n for n, s in order[max(positions) + 1:]
            if s and n != head and not n.startswith(last_stage + ".") and _is_candidate(get_module(model, n))]
    return list(dict.fromkeys(neck))


def resolve_layers(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """User-given names or globs -> editable layer names; anything not editable is refused by name."""
    names = match_layer_names(model, patterns)
    editable = []
    for name in names:
        module = get_module(model, name)
        if list(module.children()) and any(c in p for p in patterns for c in "*?["):
            continue  # a glob also matches containers; keep their editable leaves only
        editable_layer(model, name)  # raises for what cannot be edited
        editable.append(name)
    if not editable:
        raise UnsupportedArchitectureError(f"no editable layer among {', '.join(names)}")
    return editable
