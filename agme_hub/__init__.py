"""agme: remove backdoors from image classifiers by activation-guided model editing.

The public API, used by the ``agme`` command line, batch jobs and scripts alike::

    import agme_hub
    model = agme_hub.load("path/to/timm-folder")
    data = agme_hub.load_images("fashion-mnist")
    result = agme_hub.clean(model, data.subset(range(100)), trigger="badnets-white-br", target=0)
    agme_hub.evaluate(result.model, data, trigger="badnets-white-br", target=0)

Layers, each importing only from those before it: the shared vocabulary (this folder's modules),
``engine`` (model + images in memory -> edited model), ``hub`` (files and the Hub), ``app`` (SOURCE ->
finished folder; batch), ``lab`` (backdoor training, baselines, bench, demo). See docs/ARCHITECTURE.md.

``agme_hub.load`` reads timm and transformers folders. Any other ``nn.Module`` mapping images to logits works
too, given its preprocessing: ``agme_hub.clean(net, data, ..., preprocess=agme_hub.Preprocessor(...))``.
"""

from . import constants as constants
from . import devices as devices
from . import errors as errors
from . import redact as redact
from . import report as report
from ._version import __version__ as __version__
from .app import batch as batch
from .app import evaluate_source as evaluate_source
from .app import inspect_source as inspect_source
from .app import push_output as push
from .app import run_clean as run_clean
from .app import run_scan as scan
from .app import ScanReport as ScanReport
from .data import ImageSet as ImageSet
from .data import Preprocessor as Preprocessor
from .data import load_images as load_images
from .engine import CleanResult as CleanResult
from .engine import Metrics as Metrics
from .engine import clean as clean
from .engine import evaluate as evaluate
from .hub import load_model as load
from .hub import render_card as render_card
from .hub import rerender_card as rerender_card
from .hub import save_model as save
from .lab import BackdoorConfig as BackdoorConfig
from .lab import run_demo as run_demo
from .lab import train_backdoored as train_backdoored
from .options import CleanOptions as CleanOptions
from .options import MethodOptions as MethodOptions
from .progress import StageProgress as StageProgress
from .report import CleanReport as CleanReport
from .triggers import parse_trigger as parse_trigger

__all__ = [
    "__version__", "clean", "evaluate", "load", "save", "push", "run_clean", "run_demo", "inspect_source",
    "evaluate_source", "load_images", "parse_trigger", "train_backdoored", "BackdoorConfig", "CleanOptions",
    "MethodOptions", "CleanResult", "CleanReport", "ImageSet", "Preprocessor", "Metrics", "render_card",
    "rerender_card", "scan", "ScanReport", "errors", "constants", "report", "redact", "batch", "devices",
    "StageProgress",
]
