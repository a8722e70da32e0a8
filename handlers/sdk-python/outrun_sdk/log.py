"""Log lines through wasi:logging; outrun adds them to its own log with the
handler, event id and version attached."""

from __future__ import annotations

from . import _wit


def log(level: str, message: str, context: str = "") -> None:
    """level: trace, debug, info, warn or error."""
    wit = _wit.logging()
    levels = {
        "trace": wit.Level.TRACE,
        "debug": wit.Level.DEBUG,
        "info": wit.Level.INFO,
        "warn": wit.Level.WARN,
        "error": wit.Level.ERROR,
    }
    try:
        lvl = levels[level]
    except KeyError:
        raise ValueError(f"log level {level!r}: use one of {', '.join(levels)}") from None
    wit.log(lvl, context, str(message))


def trace(message: str) -> None:
    log("trace", message)


def debug(message: str) -> None:
    log("debug", message)


def info(message: str) -> None:
    log("info", message)


def warn(message: str) -> None:
    log("warn", message)


def error(message: str) -> None:
    log("error", message)
