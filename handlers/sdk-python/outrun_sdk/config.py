"""Handler config values from the `[[handler]]` entry (`config = {...}` in
[handler.allow]), read through wasi:config/store. A failing config source
is an operator's mistake, not the event's: the errors retry."""

from __future__ import annotations

from typing import Optional

from . import HandlerError, _wit


def try_get(key: str) -> Optional[str]:
    try:
        return _wit.config().get(key)
    except _wit.Err as e:
        detail = getattr(e.value, "value", e.value)
        raise HandlerError(f"reading config key `{key}` failed: {detail}", retryable=True) from None


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The value of key, default if it is not set."""
    v = try_get(key)
    return default if v is None else v


def require(key: str) -> str:
    """The value of key; an unset key is a retryable error naming it."""
    v = try_get(key)
    if v is None:
        raise HandlerError(
            f"config key `{key}` is not set; add it to this handler's config in the runtime's config file",
            retryable=True,
        )
    return v
