"""Model folders on disk and on the Hub: resolve a SOURCE, load and save checkpoints, write the card, push.

Modules: :mod:`.client` (the HfApi factory and the Hub error table), :mod:`.sources` (SOURCE -> pinned
local snapshot), :mod:`.checkpoint` (timm folders, safetensors first, atomic output folders),
:mod:`.card` (the model card), :mod:`.push` (one-commit upload).
"""

from .card import render_card as render_card
from .card import rerender_card as rerender_card
from .card import write_card as write_card
from .checkpoint import load_model as load_model
from .checkpoint import save_model as save_model
from .push import PushResult as PushResult
from .push import push_folder as push_folder
from .sources import ResolvedSource as ResolvedSource
from .sources import resolve_source as resolve_source

__all__ = ["resolve_source", "ResolvedSource", "load_model", "save_model", "render_card", "rerender_card",
           "write_card", "push_folder", "PushResult"]
