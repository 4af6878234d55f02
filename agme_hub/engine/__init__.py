"""The engine: a model and a handful of images in memory -> an edited model. No files, no network, no Hub.

    from agme_hub.engine import clean, evaluate
    result = clean(model, edit_images, trigger="badnets-white-br", target=0)
    evaluate(result.model, held_out, trigger="badnets-white-br", target=0)

Modules: :mod:`.clean` (the entry point: trigger, selection, final edit), :mod:`.select` (cross-validation
over layers and lam), :mod:`.capture` (the hooks context manager), :mod:`.layers` (which modules are
editable and how their keys are read), :mod:`.edit` (Gram statistics and the closed-form solve),
:mod:`.inversion` (surrogate triggers and target detection), :mod:`.metrics` (CA, ASR, TA, RA, DER).
"""

from .capture import capture_activations as capture_activations
from ..options import MethodOptions as MethodOptions
from .clean import CleanResult as CleanResult
from .clean import Timings as Timings
from .clean import clean as clean
from .clean import evaluate as evaluate
from .clean import inspect_layers as inspect_layers
from .metrics import Metrics as Metrics
from .metrics import measure as measure
from .metrics import predict as predict

__all__ = ["clean", "evaluate", "inspect_layers", "CleanResult", "MethodOptions", "Timings", "capture_activations",
           "Metrics", "measure", "predict"]
