"""Every Hub token agme can come to use, and scrubbing them out of text that leaves the process.

A Hub error may quote the Authorization header back; a traceback may carry that message. Whatever agme prints,
logs or writes (stderr, job.log, summary.json, reports) goes through :func:`scrub` with the tokens of
:func:`known_tokens`: the one given (``--token``, a jobs-file ``token:``), ``HF_TOKEN`` /
``HUGGING_FACE_HUB_TOKEN``, the token saved by ``hf auth login`` and the other stored tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["known_tokens", "scrub", "REDACTED"]

REDACTED = "***"
# Shorter strings are not tokens (and scrubbing them would mangle ordinary text).
_MIN_TOKEN_LENGTH = 8


def _saved_tokens() -> list[str]:
    """The token file of ``hf auth login`` and the named stored tokens, read without any network call."""
    found: list[str] = []
    try:
        from huggingface_hub import constants

        paths = [getattr(constants, "HF_TOKEN_PATH", None)]
        home = getattr(constants, "HF_HOME", None)
        if home:
            paths.append(str(Path(home) / "token"))
        for path in filter(None, paths):
            try:
                found.append(Path(path).read_text(encoding="utf-8", errors="replace").strip())
            except OSError:
                pass
        from huggingface_hub import get_stored_tokens  # older releases lack it

        found.extend(str(v) for v in (get_stored_tokens() or {}).values())
    except Exception:  # noqa: BLE001 - scrubbing must never be the thing that fails
        pass
    return found


def _resolved_token() -> str | None:
    """The token huggingface_hub itself would send (it may read other places than the ones above)."""
    if os.environ.get("HF_OIDC_RESOURCE"):  # that resolution makes a network exchange: not for scrubbing
        return None
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def known_tokens(*given: str | None) -> list[str]:
    """The tokens to scrub: those given, the environment's, the saved ones; longest first."""
    candidates: list[str | None] = [*given, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"),
                                    *_saved_tokens(), _resolved_token()]
    tokens = {t.strip() for t in candidates if isinstance(t, str) and len(t.strip()) >= _MIN_TOKEN_LENGTH}
    return sorted(tokens, key=len, reverse=True)


def scrub(text: str, tokens: Iterable[str] | None = None) -> str:
    """``text`` with every token replaced by ``***`` (``tokens`` default: :func:`known_tokens`)."""
    for token in known_tokens() if tokens is None else tokens:
        if token:
            text = text.replace(token, REDACTED)
    return text
