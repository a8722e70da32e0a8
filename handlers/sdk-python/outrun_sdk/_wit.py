"""Access to the bindings componentize-py generates (`wit_world`), which
exist only inside a component build. On the host every capability call
raises RuntimeError naming the way to test instead."""

from __future__ import annotations

import importlib
from typing import Any

try:
    from componentize_py_types import Err  # type: ignore[import-not-found]
except ImportError:  # on the host: a stand-in with the same shape

    class Err(Exception):  # type: ignore[no-redef]
        def __init__(self, value: Any):
            super().__init__(value)
            self.value = value


OUTSIDE = (
    "outrun capabilities work only inside a component built by componentize-py; "
    "run the handler with `outrun handlers run MODULE --event NAME --payload JSON`"
)


# Everything is imported when this module is: componentize-py snapshots the
# interpreter after importing the app, and a component has no files to load
# a module from later (a lazy import fails at run time).
_NAMES = (
    "outrun_handler_types",
    "emit",
    "sql",
    "kv",
    "logging",
    "store",
    "wasi_http_types",
    "outgoing_handler",
    "poll",
    "streams",
    "monotonic_clock",
)
_MODULES: dict = {}
try:
    import wit_world as _world  # type: ignore[import-not-found]
except ImportError:
    _world = None
else:
    for _name in _NAMES:
        _MODULES[_name] = importlib.import_module(f"wit_world.imports.{_name}")


def _imports(name: str) -> Any:
    try:
        return _MODULES[name]
    except KeyError:
        raise RuntimeError(OUTSIDE) from None


def types() -> Any:
    return _imports("outrun_handler_types")


def emit() -> Any:
    return _imports("emit")


def sql() -> Any:
    return _imports("sql")


def kv() -> Any:
    return _imports("kv")


def logging() -> Any:
    return _imports("logging")


def config() -> Any:
    return _imports("store")


def http_types() -> Any:
    return _imports("wasi_http_types")


def outgoing_handler() -> Any:
    return _imports("outgoing_handler")


def poll() -> Any:
    return _imports("poll")


def streams() -> Any:
    return _imports("streams")


def clock() -> Any:
    return _imports("monotonic_clock")


def world_base() -> type:
    """wit_world.WitWorld inside a build, `object` on the host."""
    return object if _world is None else _world.WitWorld


def call(fn: Any, *args: Any) -> Any:
    """Call a capability import; its `Err(cap-error)` becomes CapabilityError."""
    from . import CapabilityError

    try:
        return fn(*args)
    except Err as e:
        kind = type(e.value).__name__.removeprefix("CapError_").lower()
        raise CapabilityError(kind, str(getattr(e.value, "value", e.value))) from None
