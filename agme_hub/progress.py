"""Progress of a long run, stage by stage, as plain events: the engine reports, a front end draws.

``clean(..., progress=callback)`` calls ``callback(StageProgress(stage="capture", done=512, total=2000,
unit="images"))`` as work is done; the CLI draws the events with rich (the engine imports no UI). Stages:
``inversion`` (Adam steps), ``capture`` (images through the network), ``selection`` (trial edits of the
cross-validation), ``edit`` (layers edited), ``evaluation`` (images measured). Rates are the front end's:
counts over its clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["STAGES", "StageProgress", "ProgressCallback", "StageCounter"]

STAGES = ("inversion", "capture", "selection", "edit", "evaluation")


@dataclass(frozen=True)
class StageProgress:
    """``done`` of ``total`` ``unit`` of ``stage`` are finished."""

    stage: str
    done: int
    total: int
    unit: str


ProgressCallback = Callable[[StageProgress], None]


class StageCounter:
    """Counts the work of one stage and reports each step to ``callback`` (nothing when it is None)."""

    def __init__(self, callback: ProgressCallback | None, stage: str, total: int, unit: str) -> None:
        self.callback, self.stage, self.total, self.unit = callback, stage, int(total), unit
        self.done = 0
        self.advance(0)

    def advance(self, count: int = 1) -> None:
        self.done += int(count)
        if self.callback is not None:
            self.callback(StageProgress(self.stage, self.done, max(self.total, self.done), self.unit))
