"""The guest side of outrun for Python handlers built with componentize-py.

    from outrun_sdk import handler, emit, sql, log

    @handler
    def handle(event):
        order = event.json()
        sql.execute("INSERT INTO seen (id) VALUES ($1)", order["id"])
        emit("order.seen", {"id": order["id"]})

One module per capability (`sql`, `kv`, `http`, `log`, `config`) plus
`emit`, each a thin layer over the bindings componentize-py generates from
wit/handler.wit (the `wit_world` package). Outside a component the bindings
do not exist: this package still imports, so pure logic can be unit-tested
on the host, and capability calls raise RuntimeError.
"""

from __future__ import annotations

import json as _json
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional

from . import _wit

__all__ = [
    "handler",
    "Event",
    "HandlerError",
    "CapabilityError",
    "RetryAfter",
    "reject",
    "retry",
    "retry_after",
    "emit",
    "sql",
    "kv",
    "http",
    "log",
    "config",
]


class HandlerError(Exception):
    """A failed attempt; its writes and emits are discarded.

    retryable=True counts an attempt and backs off (the event is dead once
    its attempts are spent); False makes the event dead at once."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class CapabilityError(HandlerError):
    """A capability call failed. kind is "denied" (the config does not grant
    it), "invalid" (bad arguments, bad SQL) or "unavailable" (the resource
    failed). Denied and invalid calls cannot succeed on a retry, so they
    reject; an unavailable resource retries."""

    def __init__(self, kind: str, detail: str):
        what = {
            "denied": "capability denied",
            "invalid": "invalid capability call",
            "unavailable": "resource unavailable",
        }.get(kind, kind)
        super().__init__(f"{what}: {detail}", retryable=kind == "unavailable")
        self.kind = kind
        self.detail = detail


class RetryAfter(Exception):
    """Not now: run the event again after `seconds` without spending an
    attempt. Raised by retry_after()."""

    def __init__(self, seconds: float, message: str = ""):
        super().__init__(message)
        self.seconds = seconds
        self.message = message


def reject(message: str) -> NoReturn:
    """Fail permanently (malformed input, a request the other side refuses):
    the event goes dead at once and waits for an operator."""
    raise HandlerError(message, retryable=False)


def retry(message: str) -> NoReturn:
    """Fail transiently (a service down, a timeout): try again with backoff."""
    raise HandlerError(message, retryable=True)


def retry_after(seconds: float, message: str = "") -> NoReturn:
    """Run the event again in `seconds` without spending an attempt (bounded
    by the event's expiry). This attempt's writes and emits are discarded;
    `message` goes to the log."""
    if seconds < 0:
        raise ValueError(f"retry_after: seconds must be >= 0, got {seconds}")
    raise RetryAfter(seconds, message)


class Event:
    """One outbox event: id, name, payload (JSON text), group_id, attempt,
    max_attempts, created_at and expires_at (ms since the Unix epoch)."""

    __slots__ = (
        "id",
        "name",
        "payload",
        "group_id",
        "attempt",
        "max_attempts",
        "created_at",
        "expires_at",
    )

    def __init__(
        self,
        id: str,
        name: str,
        payload: str,
        group_id: Optional[str] = None,
        attempt: int = 1,
        max_attempts: int = 1,
        created_at: int = 0,
        expires_at: Optional[int] = None,
    ):
        self.id = id
        self.name = name
        self.payload = payload
        self.group_id = group_id
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.created_at = created_at
        self.expires_at = expires_at

    @classmethod
    def _from_wit(cls, raw: Any) -> "Event":
        return cls(
            raw.id,
            raw.name,
            raw.payload,
            raw.group_id,
            raw.attempt,
            raw.max_attempts,
            raw.created_at,
            raw.expires_at,
        )

    def json(self) -> Any:
        """The payload parsed. A payload that does not parse is the
        producer's bug, not a transient failure: it rejects the event."""
        try:
            return _json.loads(self.payload)
        except ValueError as e:
            reject(f"payload of {self.name} {self.id} is not valid JSON: {e}")

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, name={self.name!r}, attempt={self.attempt})"


def _ms(seconds: Optional[float], what: str) -> Optional[int]:
    if seconds is None:
        return None
    if seconds < 0:
        raise CapabilityError("invalid", f"{what} must be >= 0 seconds, got {seconds}")
    return int(seconds * 1000)


def emit(
    name: str,
    payload: Any,
    *,
    group_id: Optional[str] = None,
    delay: Optional[float] = None,
    expires_in: Optional[float] = None,
    max_retry: Optional[int] = None,
    idempotency_key: Optional[str] = None,
) -> None:
    """Enqueue event `name` in the transaction that acknowledges this one.

    payload: any JSON-serialisable value (a str is sent as it is: it must
    be JSON text already). delay / expires_in: seconds. Every option
    defaults to unset (max_retry: the runtime's)."""
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text = _json.dumps(payload)
        except (TypeError, ValueError) as e:
            raise CapabilityError(
                "invalid",
                f"payload of emitted event `{name}` cannot be serialised as JSON: {e}",
            ) from None
    options = _wit.emit().EmitOptions(
        group_id=group_id,
        delay_ms=_ms(delay, "delay"),
        expires_in_ms=_ms(expires_in, "expires_in"),
        max_retry=max_retry,
        idempotency_key=idempotency_key,
    )
    _wit.call(_wit.emit().emit, name, text, options)


def _run(fn: Callable[[Event], Any], raw: Any) -> Any:
    types = _wit.types()
    try:
        fn(Event._from_wit(raw))
        return types.Outcome_Done()
    except RetryAfter as r:
        if r.message:
            log.info(f"retry after {r.seconds} s: {r.message}")
        return types.Outcome_RetryAfter(int(r.seconds * 1000))
    except HandlerError as e:
        raise _wit.Err(types.HandlerError(message=e.message, retryable=e.retryable))
    except BaseException as e:  # noqa: BLE001 - anything else must not trap
        # The last line of the traceback says what went wrong; the innermost
        # frame says where. The whole traceback goes to the log.
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        frames = traceback.extract_tb(e.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
        try:
            log.error("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        except BaseException:  # noqa: BLE001 - logging must not hide the error
            pass
        raise _wit.Err(types.HandlerError(message=f"{last}{where}", retryable=True))


def handler(fn: Callable[[Event], Any]) -> Callable[[Event], Any]:
    """Make `fn(event)` the component's `handle` export.

    componentize-py calls `WitWorld().handle(event)` of the app module; this
    decorator defines that class in the module `fn` lives in. Return
    normally for done; raise (or call reject/retry/retry_after) otherwise."""
    module = sys.modules[fn.__module__]
    if getattr(module, "WitWorld", None) is not None:
        raise RuntimeError(
            f"module {fn.__module__} already has a WitWorld: use @handler once per app module"
        )

    class WitWorld(_wit.world_base()):  # type: ignore[misc]
        def handle(self, event: Any) -> Any:
            return _run(fn, event)

    module.WitWorld = WitWorld
    return fn


from . import config, http, kv, log, sql  # noqa: E402 - they import the names above
