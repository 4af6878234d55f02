"""Any torch module as the engine sees it: images in, a logits tensor out, with a known preprocessing.

The engine calls ``model(x)`` and expects a tensor of logits; it finds layers by dotted name. A timm model
already is such a module and carries its preprocessing (``pretrained_cfg``). Other modules need a view:

    view = as_classifier(hf_model, preprocess=Preprocessor(input_size=(3, 224, 224), mean=..., std=...))
    view(x)              # the logits tensor, also when hf_model returns an ImageClassifierOutput
    view.wrapped         # hf_model itself

A :class:`ClassifierView` *shares* the module's children, parameters and buffers (the very same dicts), so
every dotted name (``classifier``, ``vit.layers.3.mlp.fc1``) and every ``state_dict`` key is the module's
own, and editing the view edits the module. ``copy.deepcopy`` of a view copies the module once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import Preprocessor
from ..errors import UsageError

__all__ = ["ClassifierView", "as_classifier", "unwrap", "is_transformers_model", "logits_of"]


def is_transformers_model(model: torch.nn.Module) -> bool:
    """True for a ``transformers`` PreTrainedModel (checked without importing transformers)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "save_pretrained")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in what a classifier returned: a tensor, a ``ModelOutput`` with ``logits``, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UsageError(f"the model returned {type(output).__name__}; agme needs a module that maps images to logits")


class ClassifierView(torch.nn.Module):
    """``wrapped`` seen as images -> logits tensor, with the preprocessing its inputs need.

    Attributes:
        wrapped: the module itself (not a registered child: the view has the module's children instead).
        preprocessor: how raw uint8 images become the module's input.
        num_classes: width of the logits when known (``config.num_labels`` of transformers models).
        source_format: ``"transformers"`` for a model loaded from a transformers folder, else ``"torch"``.
        processor_config: the ``preprocessor_config.json`` it was loaded with (written back on save), or None.
    """

    def __init__(self, wrapped: torch.nn.Module, *, preprocessor: Preprocessor, source_format: str = "torch",
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        # The same dicts, not copies: names, parameters and edits are the wrapped module's own.
        object.__setattr__(self, "_modules", wrapped._modules)
        object.__setattr__(self, "_parameters", wrapped._parameters)
        object.__setattr__(self, "_buffers", wrapped._buffers)
        object.__setattr__(self, "wrapped", wrapped)
        self.preprocessor = preprocessor
        self.source_format = source_format
        self.processor_config = processor_config
        config = getattr(wrapped, "config", None)
        self.num_classes = getattr(wrapped, "num_classes", None) or getattr(config, "num_labels", None)
        self.training = wrapped.training

    def __getattr__(self, name: str) -> Any:
        """Anything else is the wrapped module's (``config``, timm's ``feature_info`` and ``get_classifier``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("wrapped")  # absent while copy.deepcopy rebuilds the view
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.wrapped(x))

    def train(self, mode: bool = True) -> "ClassifierView":
        self.wrapped.train(mode)  # the wrapped module's own flag too, not only its children's
        self.training = mode
        return self


def as_classifier(model: torch.nn.Module, *, preprocess: Preprocessor | None = None) -> torch.nn.Module:
    """The module the engine can use: ``model`` itself when it is a timm model (or already a view), else a view.

    Raises:
        UsageError: the module carries no preprocessing (no timm ``pretrained_cfg``) and none was given.
    """
    if isinstance(model, ClassifierView):
        if preprocess is None or preprocess == model.preprocessor:
            return model
        return ClassifierView(model.wrapped, preprocessor=preprocess, source_format=model.source_format,
                              processor_config=model.processor_config)
    if preprocess is None:
        if getattr(model, "pretrained_cfg", None) and not is_transformers_model(model):
            return model  # timm: the engine reads the preprocessing from pretrained_cfg
        raise UsageError(
            f"{type(model).__name__} carries no preprocessing (no timm pretrained_cfg); pass "
            "preprocess=agme_hub.Preprocessor(input_size=(C, H, W), mean=(...), std=(...)) or load it with agme_hub.load"
        )
    return ClassifierView(model, preprocessor=preprocess,
                          source_format="transformers" if is_transformers_model(model) else "torch")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module a view shows (the model itself for anything else)."""
    return model.wrapped if isinstance(model, ClassifierView) else model
