"""Baseline backdoor defences, run on the same clean-image budget as AGME.

``run_baseline(name, model, images, labels, seed=0, **overrides)`` runs one of ``list_baselines()``
on a copy of the model and returns a ``DefenseResult``:

- ``ft``: fine-tuning (NIST TrojAI / BackdoorBench baseline);
- ``fp``: fine-pruning (Liu et al. 2018);
- ``clp``: channel Lipschitzness-based pruning (Zheng et al. 2022), data-free;
- ``nc``: Neural Cleanse detection + unlearning (Wang et al. 2019);
- ``ftsam``: fine-tuning with sharpness-aware minimisation (Zhu et al. 2023).
"""

from __future__ import annotations

# Importing the defence modules fills the registry.
from . import clp as clp
from . import fp as fp
from . import ft as ft
from . import ftsam as ftsam
from . import nc as nc
from ._common import DefenseResult as DefenseResult
from ._common import list_baselines as list_baselines
from ._common import register_baseline as register_baseline
from ._common import run_baseline as run_baseline
from ._train import SAM as SAM

__all__ = ["DefenseResult", "SAM", "list_baselines", "register_baseline", "run_baseline"]
