"""Behind a reverse proxy: who the client is, which host and path prefix the app answers on.

- Client address and scheme come from `X-Forwarded-For`/`X-Forwarded-Proto` (uvicorn's
  `ProxyHeadersMiddleware`) or, when a request has no `X-Forwarded-For`, from RFC 7239
  `Forwarded` (`ProxyHeaders`), and only when the socket peer is one of
  `RECEIVER_TRUSTED_PROXIES`. The client is the rightmost address that is not a trusted proxy,
  so a value the client sent itself, to which the proxy appended, cannot spoof it.
- `RECEIVER_ROOT_PATH` (e.g. `/receiver`) mounts the app under a prefix. Both proxy styles
  work: one that strips the prefix (`location /receiver/ { proxy_pass http://up/; }`) and one
  that passes the path unchanged (`proxy_pass http://up;`). The app handles the prefix itself,
  so do not also give uvicorn `--root-path`. `RECEIVER_PUBLIC_URL` must include the prefix
  (`https://example.com/receiver`): callback URLs are built from it.
- `RECEIVER_ALLOWED_HOSTS` restricts the `Host` header (400 otherwise), callbacks included.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from starlette.types import Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

# RFC 7239: `Forwarded: for=192.0.2.43;proto=https, for="[2001:db8::1]:4711"`.
_FORWARDED_PART = re.compile(
    r'\s*(?:(?P<name>[^=;,\s]+)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^;,\s]*)|(?P<sep>[;,]))'
)


def forwarded_elements(value: str) -> list[dict[str, str]]:
    """The elements of a `Forwarded` header (one per proxy hop), names lower-cased."""
    elements: list[dict[str, str]] = [{}]
    for match in _FORWARDED_PART.finditer(value):
        if match["sep"] == ",":
            elements.append({})
        elif match["name"]:
            raw = match["value"]
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            elements[-1][match["name"].lower()] = raw
    return [e for e in elements if e]


def _node(value: str) -> tuple[str, int] | None:
    """An RFC 7239 node (`192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]:80`) as an IP and port;
    None for `unknown`, obfuscated names and anything malformed."""
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port) if port.isdigit() else 0


class ProxyHeaders(ProxyHeadersMiddleware):
    """uvicorn's `X-Forwarded-For`/`-Proto` handling for trusted proxies, plus RFC 7239
    `Forwarded`, read only when the request carries no `X-Forwarded-For` (a proxy that sets
    one header should remove the other, or a client could choose which one is believed)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            forwarded: list[bytes] = []
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    break
                if name == b"forwarded":
                    forwarded.append(value)
            else:
                peer = scope.get("client")
                if forwarded and peer and peer[0] in self.trusted_hosts:
                    self._apply(scope, b",".join(forwarded).decode("latin-1"))
                    await self.app(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    def _apply(self, scope: Any, header: str) -> None:
        elements = forwarded_elements(header)
        if not elements:
            return
        chosen = elements[0]  # every hop trusted: the first is the client
        for element in reversed(elements):
            node = _node(element.get("for", ""))
            if node is None or node[0] not in self.trusted_hosts:
                chosen = element
                break
        node = _node(chosen.get("for", ""))
        if node is not None:
            scope["client"] = node
        proto = chosen.get("proto", "").lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto if scope["type"] == "http" else proto.replace("http", "ws")


def host_matcher(allowed: list[str]) -> Callable[[Scope], bool]:
    """The `Host` check of Starlette's TrustedHostMiddleware, for the callback fast path."""
    exact = {h for h in allowed if not h.startswith("*")}
    suffixes = tuple(h[1:] for h in allowed if h.startswith("*."))

    def allowed_host(scope: Scope) -> bool:
        host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1")
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return host in exact or (bool(suffixes) and host.endswith(suffixes))

    return allowed_host


def mount(scope: Scope, prefix: str) -> None:
    """Make `scope` look mounted at `prefix`: `root_path` set, and `path` starting with it
    (Starlette routes on `path` minus `root_path`), whether or not a proxy stripped it."""
    path: str = scope["path"]
    if path != prefix and not path.startswith(prefix + "/"):
        scope["path"] = prefix + path
        raw = scope.get("raw_path")
        if raw is not None:
            scope["raw_path"] = prefix.encode("latin-1") + raw
    scope["root_path"] = prefix
