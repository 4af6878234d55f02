"""Forward hooks that read what layers receive and return, and always clean up after themselves.

    with capture_activations(model, ["layer4.0.conv1", "fc"], stop=True) as trace:
        model(x)
    trace["fc"].input    # what fc received (cloned, detached)

Hooks are registered in ``__enter__`` and removed in ``__exit__``, in reverse order, also when a
registration or the forward pass fails. Tensors are cloned on capture because timm blocks modify
tensors in place (``x += shortcut``) after a layer has returned them.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LayerNotFoundError

__all__ = ["StopForward", "Captured", "capture_activations", "get_module", "match_layer_names"]


class StopForward(Exception):
    """Raised by a hook to end the forward pass after the last traced layer; swallowed on exit."""


@dataclass
class Captured:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module with dotted name ``name``; an unknown name suggests the closest ones."""
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LayerNotFoundError(f"layer {name!r} is not a module of {type(model).__name__}{hint}")
    return modules[name]


def match_layer_names(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Expand module names and globs (``stages.3.*``) to module names, in the model's order."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)] if any(c in pattern for c in "*?[") else []
        if not hits:
            get_module(model, pattern)  # raises with suggestions
            hits = [pattern]
        out.extend(h for h in hits if h not in out)
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class capture_activations(AbstractContextManager, OrderedDict):  # noqa: N801 - used like a function
    """Trace several layers at once; the result maps each dotted name to a :class:`Captured`.

    Args:
        model: the network.
        layers: dotted module names.
        retain_input: keep what each layer receives (closed-form edits need layer inputs).
        retain_output: keep what each layer returns.
        stop: end the forward pass once every traced layer has run (cheap capture).
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], *, retain_input: bool = True,
                 retain_output: bool = False, stop: bool = False) -> None:
        OrderedDict.__init__(self)
        self._model = model
        self._layers = list(layers)
        self._retain_input = retain_input
        self._retain_output = retain_output
        self._stop = stop
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: set[str] = set()

    def __enter__(self) -> "capture_activations":
        try:
            for name in self._layers:
                module = get_module(self._model, name)
                self[name] = Captured()
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        self.reset()
        return self

    def reset(self) -> None:
        """Start a new forward pass: every layer is pending again."""
        self._pending = set(self._layers)

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            record = self[name]
            if self._retain_input:
                tensor = _first_tensor(inputs)
                record.input = tensor.detach().clone() if tensor is not None else None
            if self._retain_output:
                tensor = _first_tensor(output)
                record.output = tensor.detach().clone() if tensor is not None else None
            self._pending.discard(name)
            if self._stop and not self._pending:
                raise StopForward

        return hook

    def close(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.close()
        return exc_type is StopForward

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model once; a StopForward ends the pass early and returns None."""
        return self.call(self._model, *args, **kwargs)

    def call(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One pass through ``forward``, the model or something that runs it (a replay from a boundary, a
        batch runner); a StopForward ends the pass early and returns None."""
        self.reset()
        try:
            return forward(*args, **kwargs)
        except StopForward:
            return None
