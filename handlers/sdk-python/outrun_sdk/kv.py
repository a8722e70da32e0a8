"""Key-value store: Redis when `[kv] url` is configured, an embedded store
otherwise. Keys are confined to the handler's prefix (`kv` in
[handler.allow]): pass them unprefixed. TTLs are in seconds."""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

from . import CapabilityError, _wit


def _ms(ttl: Optional[float]) -> Optional[int]:
    if ttl is None:
        return None
    if ttl <= 0:
        raise CapabilityError("invalid", f"kv ttl must be > 0 seconds, got {ttl}")
    return max(1, int(ttl * 1000))


def get(key: str) -> Optional[bytes]:
    return _wit.call(_wit.kv().get, key)


def get_str(key: str) -> Optional[str]:
    """The value as UTF-8 text; a value that is not text rejects, naming the key."""
    raw = get(key)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CapabilityError("invalid", f"kv value of `{key}` is not UTF-8 text: {e}") from None


def set(key: str, value: Union[bytes, str], ttl: Optional[float] = None) -> None:
    """Store value (str is stored as UTF-8); ttl: seconds until it disappears."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    _wit.call(_wit.kv().set, key, data, _ms(ttl))


def delete(key: str) -> bool:
    """Returns whether the key existed."""
    return _wit.call(_wit.kv().delete, key)


def exists(key: str) -> bool:
    return _wit.call(_wit.kv().exists, key)


def expire(key: str, ttl: Optional[float]) -> bool:
    """Set (or clear, with None) the key's time to live; False if no such key."""
    return _wit.call(_wit.kv().expire, key, _ms(ttl))


def set_add(key: str, *members: str) -> int:
    """Add members to the set at key; returns how many were new."""
    return _wit.call(_wit.kv().set_add, key, list(members))


def set_remove(key: str, *members: str) -> int:
    """Remove members from the set at key; returns how many were there."""
    return _wit.call(_wit.kv().set_remove, key, list(members))


def set_members(key: str) -> List[str]:
    return _wit.call(_wit.kv().set_members, key)
