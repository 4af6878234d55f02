"""Running only the part of a network after a boundary module, from that module's cached output.

An edit rewrites layers deep in the network; what runs before them gives the same activations whatever
the edit. Cross-validation and the final edit run the network many times on the same images, so the
engine keeps the output of one module B (the boundary) per image and replays only what runs after it:
B's forward returns the cached tensor, and every module that finished before B started returns a
placeholder filled with NaN instead of computing.

Which module may be B is not a question of names: a residual branch or a skip connection can read an
upstream activation that B's output does not carry (``layer4.0`` reads the input of ``layer4.0.conv1``
again through its shortcut). So candidates are tried from the deepest module that ends before the first
edited layer starts, and one is kept only if replaying a sample from it reproduces the full model's
logits: a placeholder's NaN that leaks into the logits fails the check. When none passes, the engine
runs the whole network, as it always did.

    plan = plan_replay(model, ["layer4.0.conv1", "layer4.0.downsample.0"], sample)   # boundary "layer3"
    with plan.installed(trial) as run:     # trial: a copy of model, possibly edited after the boundary
        logits = run(cached_layer3_outputs)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .capture import StopForward, capture_activations, get_module
from .classifier import logits_of

if TYPE_CHECKING:
    from .edit import PairBatch

__all__ = ["CachedBoundary", "Replay", "deeper_boundaries", "plan_replay", "reads_from"]

# Candidate boundaries verified at most (each costs one forward pass of the sample).
_MAX_TRIES = 8


@dataclass(frozen=True)
class _Placeholder:
    shape: tuple[int, ...]  # without the batch dim
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Replay:
    """How to run a model from the cached output of ``boundary``: which modules to skip and what they give."""

    boundary: str
    skipped: dict[str, _Placeholder]  # modules that finish before the boundary starts (outermost ones)
    input: _Placeholder  # the model's own input, also a placeholder
    output: _Placeholder  # the boundary's output, what the cache holds per image

    def bytes_per_image(self) -> int:
        return int(torch.Size(self.output.shape).numel()) * torch.empty((), dtype=self.output.dtype).element_size()

    @contextmanager
    def installed(self, model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor], Any]]:
        """Inside: ``run(cached)`` runs ``model`` from the boundary outputs ``cached`` (one row per image).

        ``model`` has the same module names as the one planned on (a copy, edited after the boundary).
        """
        current: dict[str, Any] = {"n": 0, "cached": None}

        def placeholder(spec: _Placeholder) -> torch.Tensor:
            fill = float("nan") if spec.dtype.is_floating_point else 0
            return torch.full((current["n"], *spec.shape), fill, dtype=spec.dtype, device=spec.device)

        def skipped(spec: _Placeholder):  # type: ignore[no-untyped-def]
            return lambda *args, **kwargs: placeholder(spec)

        def boundary(*args: Any, **kwargs: Any) -> torch.Tensor:
            # a clone: modules after the boundary may write into what they receive (x += shortcut)
            return current["cached"].clone()

        modules = dict(model.named_modules())
        replaced: list[tuple[torch.nn.Module, Any]] = []
        try:
            for name, spec in [*self.skipped.items(), (self.boundary, None)]:
                module = modules[name]
                replaced.append((module, module.__dict__.get("forward")))
                module.forward = boundary if spec is None else skipped(spec)  # an instance attribute wins over the class's

            def run(cached: torch.Tensor) -> Any:
                current["n"], current["cached"] = len(cached), cached
                try:
                    return model(placeholder(self.input))
                finally:
                    current["cached"] = None

            yield run
        finally:
            for module, own in reversed(replaced):
                if own is None:
                    del module.forward
                else:
                    module.forward = own


@dataclass(frozen=True)
class CachedBoundary:
    """A group's replay plan and its boundary's outputs: per augmented copy (0 = D), one row per image of D."""

    plan: Replay
    clean: list[torch.Tensor]
    triggered: list[torch.Tensor]
    # per layer of the group that an earlier one feeds (a chain), a deeper boundary it replays from once the
    # layers before that boundary are edited (:func:`deeper_boundaries`)
    deeper: dict[str, Replay] = field(default_factory=dict)

    def rows(self, batch: PairBatch) -> torch.Tensor:
        """The boundary outputs of a batch of pairs: its clean rows, then its triggered rows."""
        index = torch.as_tensor(batch.source)
        return torch.cat([self.clean[batch.copy][index], self.triggered[batch.copy][index]])


@dataclass
class _Call:
    start: int
    end: int = -1
    calls: int = 0
    out: _Placeholder | None = None


def _record_calls(model: torch.nn.Module, sample: torch.Tensor) -> tuple[dict[str, _Call], torch.Tensor]:
    """Start and end position of every module's call in one forward pass, and the logits."""
    events = 0
    calls: dict[str, _Call] = {}
    handles = []

    def on_start(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, inputs: Any) -> None:
            nonlocal events
            call = calls.setdefault(name, _Call(start=events))
            call.calls += 1
            events += 1
        return hook

    def on_end(name: str):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            nonlocal events
            call = calls[name]
            call.end = events
            events += 1
            if isinstance(output, torch.Tensor) and output.ndim >= 1 and output.shape[0] == len(sample):
                call.out = _Placeholder(tuple(output.shape[1:]), output.dtype, output.device)
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(on_start(name)))
                handles.append(module.register_forward_hook(on_end(name)))
        with torch.inference_mode():
            logits = logits_of(model.eval()(sample))
    finally:
        for handle in reversed(handles):
            handle.remove()
    return calls, logits


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _is_within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _plan_for(calls: dict[str, _Call], boundary: str, sample: torch.Tensor) -> Replay | None:
    start = calls[boundary].start
    before = {n for n, c in calls.items() if c.end < start}
    skipped = {}
    for name in sorted(before, key=lambda n: calls[n].start):
        if _parent(name) in before:
            continue  # its parent is skipped as a whole
        call = calls[name]
        if call.calls != 1 or call.out is None:
            return None
        skipped[name] = call.out
    out = calls[boundary].out
    if out is None:
        return None
    return Replay(boundary, skipped, _Placeholder(tuple(sample.shape[1:]), sample.dtype, sample.device), out)


def plan_replay(model: torch.nn.Module, layers: list[str], sample: torch.Tensor) -> Replay | None:
    """The deepest boundary before all of ``layers`` from which replaying ``sample`` gives the model's logits.

    ``sample``: a few preprocessed images (2 to 4). ``None`` when no module passes (run the whole model).
    """
    calls, logits = _record_calls(model, sample)
    firsts = [calls[n].start for n in layers if n in calls]
    if len(firsts) != len(layers):
        return None
    first = min(firsts)
    first_name = next(n for n in layers if calls[n].start == first)
    # Deepest first; only modules whose parent encloses the first edited layer (a sibling of it or of one of
    # its containers): a module deeper inside a finished block carries no more than that block's output.
    candidates = sorted((n for n, c in calls.items() if c.end < first and c.calls == 1 and c.out is not None
                         and _is_within(first_name, _parent(n))), key=lambda n: -calls[n].end)
    candidates = candidates[:_MAX_TRIES]
    if not candidates:
        return None
    with torch.inference_mode(), capture_activations(model, candidates, retain_input=False,
                                                     retain_output=True) as trace:
        trace.run(sample)
        outputs = {n: trace[n].output for n in candidates}
    for name in candidates:
        plan = _verified_plan(model, calls, name, outputs[name], sample, logits)
        if plan is not None:
            return plan
    return None


def _verified_plan(model: torch.nn.Module, calls: dict[str, _Call], boundary: str, output: torch.Tensor | None,
                   sample: torch.Tensor, logits: torch.Tensor) -> Replay | None:
    """The plan from ``boundary`` if replaying its ``output`` for ``sample`` gives the model's ``logits``."""
    plan = _plan_for(calls, boundary, sample)
    if plan is None or output is None:
        return None
    try:
        with torch.inference_mode(), plan.installed(model) as run:
            replayed = logits_of(run(output))
    except Exception:  # noqa: BLE001 - a placeholder of the wrong kind broke the forward: not this boundary
        return None
    if replayed.shape == logits.shape and bool(torch.isfinite(replayed).all()) \
            and torch.allclose(replayed, logits, rtol=1e-4, atol=1e-5):
        return plan
    return None


def deeper_boundaries(model: torch.nn.Module, plan: Replay, layers: list[str], sample: torch.Tensor
                      ) -> dict[str, Replay]:
    """Per layer of ``layers``, a boundary deeper than ``plan``'s to replay it from, where there is one.

    A chain of edits through several blocks (a ViT's last blocks) captures each later layer again once the
    layers before it are edited. From ``plan``'s boundary that replays every block in between, for every
    layer (a cost that grows with the square of the chain's depth); from the output of the block just before
    the layer, in the edited model, it replays one. The deeper boundary is the last module beside ``plan``'s
    boundary (a sibling: ``blocks.10`` beside ``blocks.8``) that ends before the layer starts, kept only if
    replaying ``sample`` from it gives the model's logits. Layers without one replay from ``plan``.
    """
    calls, logits = _record_calls(model, sample)
    parent, after = _parent(plan.boundary), calls[plan.boundary].end
    siblings = [n for n, c in calls.items() if n != plan.boundary and _parent(n) == parent and c.start > after
                and c.calls == 1 and c.out is not None]
    wanted = {}
    for layer in layers:
        before = [n for n in siblings if layer in calls and calls[n].end < calls[layer].start]
        if before:
            wanted[layer] = max(before, key=lambda n: calls[n].end)
    if not wanted:
        return {}
    names = list(dict.fromkeys(wanted.values()))
    with torch.inference_mode(), capture_activations(model, names, retain_input=False, retain_output=True) as trace:
        trace.run(sample)
        outputs = {n: trace[n].output for n in names}
    plans = {n: _verified_plan(model, calls, n, outputs[n], sample, logits) for n in names}
    return {layer: plans[name] for layer, name in wanted.items() if plans[name] is not None}


def reads_from(model: torch.nn.Module, layer: str, upstream: list[str], sample: torch.Tensor) -> bool:
    """Whether what ``layer`` receives depends on the parameters of any module in ``upstream``.

    Read from the autograd graph of one forward pass of ``sample`` (exact for this network's forward):
    the final edit re-captures a layer's keys only when an earlier edit can change them.
    """
    params = [p for name in upstream for p in get_module(model, name).parameters(recurse=False)]
    wanted = {id(p) for p in params}
    saved = [p.requires_grad for p in params]
    seen_node: dict[str, Any] = {}

    def hook(module: torch.nn.Module, inputs: Any) -> None:
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        seen_node["node"] = first.grad_fn if first is not None else None
        raise StopForward

    handle = get_module(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            try:
                model.eval()(sample)
            except StopForward:
                pass
    finally:
        handle.remove()
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    if "node" not in seen_node:
        return True  # the layer did not run on the sample: assume the worst
    stack, visited = [seen_node["node"]], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
