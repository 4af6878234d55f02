"""agme: remove backdoors from image classifiers by activation-guided model editing.

The public API, used by the ``agme`` command line, batch jobs and scripts alike::

    import agme_hub
    model = agme_hub.load("path/to/timm-folder")
    data = agme_hub.load_images("fashion-mnist")
    result = agme_hub.clean(model, data.subset(range(100)), trigger="badnets-white-br", target=0)
    agme_hub.evaluate(result.model, data, trigger="badnets-white-br", target=0)

``agme_hub.load`` reads timm and transformers folders. Any other ``nn.Module`` mapping images to logits works
too, given its preprocessing: ``agme_hub.clean(net, data, ..., preprocess=agme_hub.Preprocessor(...))``.
"""

__version__ = "0.1.0"

from . import batch as batch
from . import constants as constants
from . import errors as errors
from .attack import BackdoorConfig as BackdoorConfig
from .attack import train_backdoored as train_backdoored
from .card import rerender_card as rerender_card
from .card import render_card as render_card
from .checkpoint import load_model as load
from .checkpoint import save_model as save
from .data import ImageSet as ImageSet
from .data import Preprocessor as Preprocessor
from .data import load_images as load_images
from .engine import CleanResult as CleanResult
from .engine import clean as clean
from .engine import evaluate as evaluate
from .metrics import Metrics as Metrics
from .options import CleanOptions as CleanOptions
from .pipeline import evaluate_source as evaluate_source
from .pipeline import inspect_source as inspect_source
from .pipeline import push_output as push
from .pipeline import run_clean as run_clean
from .pipeline import run_demo as run_demo
from .triggers import parse_trigger as parse_trigger

__all__ = [
    "__version__", "clean", "evaluate", "load", "save", "push", "run_clean", "run_demo", "inspect_source",
    "evaluate_source", "load_images", "parse_trigger", "train_backdoored", "BackdoorConfig", "CleanOptions",
    "CleanResult", "ImageSet", "Preprocessor", "Metrics", "render_card", "rerender_card", "errors", "constants", "batch",
]
