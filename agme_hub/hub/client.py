"""The one Hub client factory and the one table that turns huggingface_hub's errors into agme's.

Both the pull side (:mod:`.sources`) and the push side (:mod:`.push`) use them, so neither imports the other.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._version import __version__
from ..errors import (
    AgmeError,
    GatedRepoError,
    NetworkError,
    OfflineCacheMissError,
    PushError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnauthorizedError,
    UnsupportedFormatError,
    UsageError,
)
from ..redact import known_tokens, scrub

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["HubAction", "make_hub_api", "map_hub_error", "hub_offline_mode", "hub_timeout"]

_HTTP_LIBS = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}

HubAction = Literal["read", "push"]


def make_hub_api(*, token: str | None = None, endpoint: str | None = None) -> HfApi:
    """The one way agme builds an ``HfApi``: tagged ``agme/<version>`` in the user agent, as timm does.

    It also gives huggingface_hub's shared HTTP client a timeout (see :func:`hub_timeout`): its default has
    none, and a server that accepts the connection but never answers would hang agme forever.
    """
    from huggingface_hub import HfApi

    _install_client_timeout()
    return HfApi(endpoint=endpoint, token=token, library_name="agme", library_version=__version__)


def hub_timeout() -> float:
    """Seconds agme waits for the Hub to answer a request: ``AGME_HUB_TIMEOUT``, else huggingface_hub's
    ``HF_HUB_ETAG_TIMEOUT`` when set, else 30. Downloads follow ``HF_HUB_DOWNLOAD_TIMEOUT`` as usual."""
    for name in ("AGME_HUB_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"):
        try:
            value = float(os.environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return 30.0


def _install_client_timeout() -> None:
    """Make huggingface_hub's shared client time out (its factory builds it with ``timeout=None``)."""
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    seconds = hub_timeout()
    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    default = getattr(_http, "default_client_factory", None)
    if default is None or not callable(getattr(_http, "set_client_factory", None)):
        return  # an older release (requests): its calls take explicit timeouts
    installed = getattr(factory, "_agme_timeout", None)
    if (factory is not default and installed is None) or installed == seconds:
        return  # the user's own factory wins; or ours is in place already

    def client_with_timeout() -> Any:
        client = default()
        client.timeout = seconds
        return client

    client_with_timeout._agme_timeout = seconds  # type: ignore[attr-defined]
    _http.set_client_factory(client_with_timeout)


# huggingface_hub errors -> agme errors
def hub_offline_mode() -> bool:
    from huggingface_hub import constants as hf_constants

    is_offline = getattr(hf_constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else getattr(hf_constants, "HF_HUB_OFFLINE", False))


class _NeverRaised(Exception):
    """Stands in for an error class the installed huggingface_hub does not have."""


def _hub_error(name: str) -> type[BaseException]:
    # huggingface_hub.errors exists since 0.23; older releases kept these in huggingface_hub.utils.
    for module_name in ("huggingface_hub.errors", "huggingface_hub.utils"):
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls
    return _NeverRaised


@dataclass(frozen=True)
class _Context:
    repo: str  # "org/name" or "org/name@rev"
    action: HubAction
    offline: bool
    detail: str  # first line of the Hub's own message, token removed


def _http_error(ctx: _Context, err: BaseException) -> AgmeError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        access = "write to" if ctx.action == "push" else "read"
        return UnauthorizedError(f"the Hub refused the token (HTTP {status}) to {access} {ctx.repo}; pass a token "
                                 f"with {'write' if ctx.action == 'push' else 'read'} access (--token or HF_TOKEN)")
    if ctx.action == "push":
        return PushError(f"push to {ctx.repo} failed (HTTP {status}: {ctx.detail}); nothing was committed")
    return NetworkError(f"the Hub answered HTTP {status} for {ctx.repo} ({ctx.detail}); try again later")


def _cache_miss(ctx: _Context, err: BaseException) -> AgmeError:
    if ctx.offline:
        return OfflineCacheMissError(f"offline and the cache has no complete snapshot of {ctx.repo}; "
                                     "run once online to fill the cache")
    return NetworkError(f"cannot reach the Hub for {ctx.repo} and the cache does not hold it; check the network")


# Order matters: subclasses before their bases (GatedRepoError < RepositoryNotFoundError,
# LocalEntryNotFoundError < EntryNotFoundError, OfflineModeIsEnabled < ConnectionError).
_HUB_ERROR_TABLE: list[tuple[str, Callable[[_Context, BaseException], AgmeError]]] = [
    ("GatedRepoError", lambda c, e: GatedRepoError(
        f"{c.repo} is gated: accept its conditions on the Hub and pass a token of an account with access")),
    ("RepositoryNotFoundError", lambda c, e: RepoNotFoundError(
        f"{c.repo} not found on the Hub (or private and the token cannot see it); check the id or pass --token")),
    ("RevisionNotFoundError", lambda c, e: RevisionNotFoundError(
        f"revision not found: {c.repo}; check the branch, tag or commit sha")),
    ("LocalEntryNotFoundError", _cache_miss),
    ("EntryNotFoundError", lambda c, e: UnsupportedFormatError(f"{c.repo} lacks a required file ({c.detail})")),
    ("OfflineModeIsEnabled", lambda c, e: OfflineCacheMissError(
        f"offline mode is on and {c.repo} needs the Hub; run once online to fill the cache")),
    ("HFValidationError", lambda c, e: UsageError(f"invalid Hub id or revision {c.repo}: {c.detail}")),
    ("HfHubHTTPError", _http_error),
]


def map_hub_error(
    err: BaseException,
    *,
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    action: HubAction = "read",
    offline: bool = False,
) -> AgmeError | None:
    """Translate an error from huggingface_hub (or its HTTP stack) into the matching agme error.

    Args:
        err: the exception raised by a huggingface_hub call.
        repo_id: the repo the call was about, for the message.
        revision: the revision asked for, if any.
        token: the token in use; it is scrubbed from anything copied out of ``err``.
        action: ``"read"`` (pull) or ``"push"``; decides between NetworkError and PushError and the wording.
        offline: whether the call ran in offline mode (a cache miss is then OfflineCacheMissError).

    Returns:
        The agme error to raise (one-line message, no token), or None when ``err`` is not a Hub error.
    """
    detail = (str(getattr(err, "server_message", "") or err).strip().splitlines() or [""])[0]
    detail = scrub(detail, known_tokens(token))[:200]
    repo = f"{repo_id}@{revision}" if revision else repo_id
    ctx = _Context(repo=repo, action=action, offline=offline, detail=detail or err.__class__.__name__)
    for name, build in _HUB_ERROR_TABLE:
        if isinstance(err, _hub_error(name)):
            return build(ctx, err)
    if isinstance(err, json.JSONDecodeError) or (isinstance(err, (KeyError, TypeError)) and action == "read"
                                                  and _raised_by_hub_client(err)):
        return NetworkError(f"the Hub (or a proxy) answered {repo} with something that is not the Hub's JSON "
                            f"({err.__class__.__name__}); check HF_ENDPOINT and try again later")
    if _is_connection_error(err):
        return NetworkError(f"cannot reach the Hub for {repo} ({err.__class__.__name__}); check the network "
                            "or use --offline with a filled cache")
    return None


def _raised_by_hub_client(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is in huggingface_hub (a response it could not parse)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "huggingface_hub" in tb.tb_frame.f_code.co_filename


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    # requests/httpx/httpx2 transport errors do not derive from the builtin ConnectionError.
    return any(cls.__module__.split(".")[0] in _HTTP_LIBS and
               any(word in cls.__name__ for word in ("Connect", "Timeout", "Transport", "Network"))
               for cls in type(err).__mro__)
