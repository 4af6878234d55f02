"""Find a model's stages and classifier by running it once, for modules without timm's ``feature_info``.

timm lists the output of every stage in ``model.feature_info``; transformers models and plain torch modules do
not. What they share is their structure: a backbone is a run of sibling blocks of one class, called one after
the other (``layer1..layer4`` of a torchvision ResNet, ``encoder.stages.*`` of ConvNeXt and ResNet in
transformers, ``vit.layers.*`` of a ViT), and the classifier is the last linear map whose output is the logits.

    stages = traced_stages(model, sample)   # ["layer1", "layer2", "layer3", "layer4"]
    head = traced_head(model, sample)       # "fc"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .classifier import logits_of

__all__ = ["TracedCall", "trace_calls", "traced_stages", "traced_head", "is_editable_module"]


@dataclass(frozen=True)
class TracedCall:
    """One module call of a forward pass: its dotted name and the shape of its first tensor output."""

    name: str
    output_shape: tuple[int, ...]  # without the batch dim; () when the output holds no tensor


def is_editable_module(module: torch.nn.Module) -> bool:
    """A dense linear map the engine can rewrite (the size limit is checked by :mod:`agme_hub.units`)."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _first_tensor_shape(value: object) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[1:])
    logits = getattr(value, "logits", None)  # transformers' ModelOutput
    if isinstance(logits, torch.Tensor):
        return tuple(logits.shape[1:])
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor_shape(value[0])
    last_hidden = getattr(value, "last_hidden_state", None)
    if isinstance(last_hidden, torch.Tensor):
        return tuple(last_hidden.shape[1:])
    return ()


def trace_calls(model: torch.nn.Module, sample: torch.Tensor) -> list[TracedCall]:
    """Every module call (containers too) in the order the calls *start*, with output shapes."""
    starts: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def on_start(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, inputs: object) -> None:  # returns None: the input stays as it is
            starts.append(name)
        return hook

    def on_end(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
            shapes.setdefault(name, _first_tensor_shape(output))
        return hook

    try:
        for name, module in model.named_modules():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(on_start(name)))
            handles.append(module.register_forward_hook(on_end(name)))
        with torch.inference_mode():
            model.eval()(sample)
    finally:
        for handle in reversed(handles):
            handle.remove()
    first_start = list(dict.fromkeys(starts))
    return [TracedCall(name, shapes.get(name, ())) for name in first_start]


def _holds_editable(module: torch.nn.Module) -> bool:
    return any(is_editable_module(m) for m in module.modules())


def traced_stages(model: torch.nn.Module, sample: torch.Tensor) -> list[str]:
    """The backbone's blocks: the shallowest (then longest) run of >= 2 consecutive sibling calls of one class.

    Only blocks that hold an editable layer count (a run of ReLUs is not a backbone). Returns [] when the
    model has no such run (a plain ``nn.Sequential`` of single layers).
    """
    modules = dict(model.named_modules())
    calls = trace_calls(model, sample)
    siblings: dict[str, list[str]] = {}
    for call in calls:
        parent = call.name.rpartition(".")[0]
        siblings.setdefault(parent, []).append(call.name)
    best: list[str] = []
    best_depth = None
    for parent, names in siblings.items():
        depth = parent.count(".") + (1 if parent else 0)
        run: list[str] = []
        for name in names + [""]:  # a sentinel closes the last run
            module = modules.get(name)
            if run and module is not None and type(module) is type(modules[run[-1]]) and _holds_editable(module):
                run.append(name)
                continue
            if len(run) >= 2 and (best_depth is None or depth < best_depth
                                  or (depth == best_depth and len(run) > len(best))):
                best, best_depth = list(run), depth
            run = [name] if module is not None and _holds_editable(module) else []
    return best


def traced_head(model: torch.nn.Module, sample: torch.Tensor) -> str | None:
    """The classifier: the last editable layer called whose output has the logits' width (None if none)."""
    calls = trace_calls(model, sample)
    with torch.inference_mode():
        num_classes = logits_of(model.eval()(sample)).shape[-1]
    modules = dict(model.named_modules())
    heads = [c.name for c in calls
             if is_editable_module(modules[c.name]) and c.output_shape and _width(c.output_shape) == num_classes]
    return heads[-1] if heads else None


def _width(shape: tuple[int, ...]) -> int:
    """Feature width of an output: C of (C, H, W), D of (T, D) or (D,)."""
    return shape[0] if len(shape) == 3 else shape[-1]
