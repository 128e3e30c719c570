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

import contextlib
import ipaddress
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send
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


def trusted(hosts: list[str]) -> Callable[[str], bool]:
    """Whether a peer address is one of `hosts` (addresses or networks; `*`: any)."""
    if "*" in hosts:
        return lambda address: True
    networks = []
    for host in hosts:
        with contextlib.suppress(ValueError):  # a name, not an address: never a socket peer
            networks.append(ipaddress.ip_network(host, strict=False))

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    return is_trusted


class ProxyHeaders:
    """Client address and scheme from a trusted proxy's headers: RFC 7239 `Forwarded` when the
    request carries no `X-Forwarded-For` (a proxy that sets one header should remove the other,
    or a client could choose which one is believed), else uvicorn's `X-Forwarded-For`/`-Proto`
    middleware, which this wraps."""

    def __init__(self, app: ASGIApp, trusted_hosts: list[str]) -> None:
        self.app = app
        self.x_forwarded = ProxyHeadersMiddleware(app, trusted_hosts)  # type: ignore[arg-type]
        self.trusted = trusted(trusted_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            forwarded: list[bytes] = []
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    break
                if name == b"forwarded":
                    forwarded.append(value)
            else:
                peer = scope.get("client")
                if forwarded and peer and self.trusted(peer[0]):
                    self._apply(scope, b",".join(forwarded).decode("latin-1"))
                    await self.app(scope, receive, send)
                    return
        await self.x_forwarded(scope, receive, send)  # type: ignore[arg-type]

    def _apply(self, scope: Scope, header: str) -> None:
        elements = forwarded_elements(header)
        if not elements:
            return
        chosen = elements[0]  # every hop trusted: the first is the client
        for element in reversed(elements):
            node = _node(element.get("for", ""))
            if node is None or not self.trusted(node[0]):
                chosen = element
                break
        node = _node(chosen.get("for", ""))
        if node is not None:
            scope["client"] = node
        proto = chosen.get("proto", "").lower()
        if proto in ("http", "https"):
            scope["scheme"] = proto if scope["type"] == "http" else proto.replace("http", "ws")


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
