"""Outgoing HTTP through wasi:http. Hosts must be listed in `http` of
[handler.allow].

    r = http.get("http://customers.local/customers/7").raise_for_status()
    customer = r.json()

A denied host or an invalid request raises a rejecting HttpError; a
timeout or transport failure a retryable one. A response with an error
status is returned; raise_for_status() turns 5xx, 429 and 408 into a retry
and any other non-2xx status into a reject."""

from __future__ import annotations

import json as _json
from typing import Any, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from . import HandlerError, _wit

DEFAULT_TIMEOUT = 10.0
_READ_CHUNK = 64 * 1024
# wasi:io output streams take at most 4096 bytes per blocking-write-and-flush.
_WRITE_CHUNK = 4096


class HttpError(HandlerError):
    """No response: kind is "denied", "invalid", "timeout" or "transport"."""

    def __init__(self, kind: str, method: str, url: str, detail: str):
        text = {
            "denied": f"{method} {url}: host not allowed; add it to `http` in [handler.allow]",
            "invalid": f"{method} {url}: invalid request: {detail}",
            "timeout": f"{method} {url}: no response within {detail}",
            "transport": f"{method} {url}: {detail}",
        }[kind]
        super().__init__(text, retryable=kind in ("timeout", "transport"))
        self.kind = kind


def is_transient_status(status: int) -> bool:
    """Statuses worth retrying: the server is overloaded, down or slow."""
    return status >= 500 or status in (408, 429)


class Response:
    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes, request: str = ""):
        self.status = status
        self.headers = headers
        self.body = body
        self.request = request

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str) -> Optional[str]:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed; a body that does not parse rejects (the other
        service's fault, a retry will not fix it)."""
        try:
            return _json.loads(self.body)
        except ValueError as e:
            raise HandlerError(
                f"{self.request}: response body is not JSON ({e}): {self.text()[:200]}",
                retryable=False,
            ) from None

    def raise_for_status(self) -> "Response":
        if self.ok:
            return self
        raise HandlerError(
            f"{self.request}: status {self.status}: {self.text()[:200]}",
            retryable=is_transient_status(self.status),
        )

    def __repr__(self) -> str:
        return f"Response(status={self.status}, {len(self.body)} bytes)"


def _method(t: Any, name: str) -> Any:
    known = {
        "GET": t.Method_Get,
        "HEAD": t.Method_Head,
        "POST": t.Method_Post,
        "PUT": t.Method_Put,
        "DELETE": t.Method_Delete,
        "OPTIONS": t.Method_Options,
        "PATCH": t.Method_Patch,
    }
    cls = known.get(name)
    return cls() if cls else t.Method_Other(name)


def _error_from_code(code: Any, method: str, url: str, timeout: float) -> HttpError:
    name = type(code).__name__.removeprefix("ErrorCode_")
    if name == "HttpRequestDenied":
        return HttpError("denied", method, url, "")
    if name in ("HttpRequestUriInvalid", "HttpRequestMethodInvalid"):
        return HttpError("invalid", method, url, name)
    if name in (
        "DnsTimeout",
        "ConnectionTimeout",
        "ConnectionReadTimeout",
        "ConnectionWriteTimeout",
        "HttpResponseTimeout",
    ):
        return HttpError("timeout", method, url, f"{timeout} s")
    if name == "DnsError":
        payload = getattr(code, "value", None)
        detail = getattr(payload, "rcode", None) or getattr(payload, "info_code", None) or ""
        return HttpError("transport", method, url, f"DNS lookup failed {detail}".strip())
    if name == "ConnectionRefused":
        return HttpError("transport", method, url, "connection refused")
    if name == "InternalError" and getattr(code, "value", None):
        return HttpError("transport", method, url, code.value)
    return HttpError("transport", method, url, name)


def request(
    method: str,
    url: str,
    headers: Optional[Union[Dict[str, str], List[Tuple[str, str]]]] = None,
    body: Union[bytes, str, None] = None,
    json: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """Send a request and read the whole response, blocking the handler.
    json= sends the value as JSON with content-type application/json."""
    t = _wit.http_types()
    method = method.upper()
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if json is not None:
        body = _json.dumps(json)
        if not any(n.lower() == "content-type" for n, _ in pairs):
            pairs.append(("content-type", "application/json"))
    data = body.encode("utf-8") if isinstance(body, str) else (body or b"")
    # A request that may carry content states its length, 0 included:
    # without one the host streams the body chunked and ends it after the
    # request went out, and a server that answers before that end (it reads
    # no body for a DELETE) may close the connection under its answer.
    bodiless = method in ("GET", "HEAD", "OPTIONS")
    if (data or not bodiless) and not any(n.lower() == "content-length" for n, _ in pairs):
        pairs.append(("content-length", str(len(data))))

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HttpError("invalid", method, url, "the URL needs http:// or https:// and a host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    try:
        fields = t.Fields.from_list([(n.lower(), v.encode("utf-8")) for n, v in pairs])
    except _wit.Err as e:
        why = type(e.value).__name__.removeprefix("HeaderError_")
        raise HttpError("invalid", method, url, f"headers rejected ({why})") from None
    req = t.OutgoingRequest(fields)
    try:
        req.set_method(_method(t, method))
        req.set_scheme(t.Scheme_Https() if parts.scheme == "https" else t.Scheme_Http())
        req.set_authority(parts.netloc)
        req.set_path_with_query(path)
    except _wit.Err:
        raise HttpError("invalid", method, url, "method, host or path rejected") from None
    out_body = req.body()

    ns = int(timeout * 1e9)
    options = t.RequestOptions()
    for setter in (
        options.set_connect_timeout,
        options.set_first_byte_timeout,
        options.set_between_bytes_timeout,
    ):
        try:
            setter(ns)
        except _wit.Err:
            pass  # a host that refuses is still bounded by our own deadline

    try:
        future = _wit.outgoing_handler().handle(req, options)
    except _wit.Err as e:
        raise _error_from_code(e.value, method, url, timeout) from None
    if data:
        with out_body.write() as stream:
            for i in range(0, len(data), _WRITE_CHUNK):
                try:
                    stream.blocking_write_and_flush(data[i : i + _WRITE_CHUNK])
                except _wit.Err as e:
                    raise HttpError("transport", method, url, f"writing the body failed: {e.value}") from None
    try:
        t.OutgoingBody.finish(out_body, None)
    except _wit.Err as e:
        raise _error_from_code(e.value, method, url, timeout) from None

    poll = _wit.poll()
    clock = _wit.clock()
    timer = clock.subscribe_instant(clock.now() + ns)
    # A pollable is a child of its future: it goes first (the with order).
    with future, future.subscribe() as ready:
        while True:
            got = future.get()
            if got is not None:
                break
            if timer.ready():
                raise HttpError("timeout", method, url, f"{timeout} s")
            poll.poll([ready, timer])
    inner = got.value
    if type(got).__name__ == "Err":
        raise HttpError("transport", method, url, "response already taken")
    if type(inner).__name__ == "Err":
        raise _error_from_code(inner.value, method, url, timeout)
    return _read(inner.value, timer, method, url, timeout)


def _read(response: Any, timer: Any, method: str, url: str, timeout: float) -> Response:
    streams = _wit.streams()
    poll = _wit.poll()
    t = _wit.http_types()
    # Children go before their parents: headers and the body stream before
    # the response, the stream's pollable before the stream.
    with response:
        status = response.status()
        with response.headers() as fields:
            headers = [(n, v.decode("utf-8", errors="replace")) for n, v in fields.entries()]
        incoming = response.consume()
        chunks = []
        with incoming.stream() as stream, stream.subscribe() as readable:
            while True:
                try:
                    chunk = stream.read(_READ_CHUNK)
                except _wit.Err as e:
                    if isinstance(e.value, streams.StreamError_Closed):
                        break
                    raise HttpError("transport", method, url, "reading the body failed") from None
                if chunk:
                    chunks.append(chunk)
                elif timer.ready():
                    raise HttpError("timeout", method, url, f"{timeout} s")
                else:
                    poll.poll([readable, timer])
        with t.IncomingBody.finish(incoming):
            pass
    return Response(status, headers, b"".join(chunks), f"{method} {url}")


def get(url: str, headers: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
    return request("GET", url, headers=headers, timeout=timeout)


def post(url: str, body: Any = None, json: Any = None, headers: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
    return request("POST", url, headers=headers, body=body, json=json, timeout=timeout)


def delete(url: str, headers: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
    return request("DELETE", url, headers=headers, timeout=timeout)
