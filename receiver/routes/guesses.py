"""Wrong admin tokens, counted per client, wherever they are tried: the dashboard's sign-in
form and the admin API's bearer token are one secret, so one count guards both (else a
guesser blocked on the form would simply move to `/v1`)."""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque

# After FAILURES wrong tokens from one client within WINDOW seconds, its next attempts are
# refused (429) until the oldest failure is a window old.
FAILURES = 5
WINDOW = 60.0
CLIENTS = 10_000  # clients remembered at most (the least recent forgotten first)


class SignInLimit:
    """Wrong admin tokens, counted per client address: the one the proxy middleware resolved
    (the socket peer, or the forwarded client when the peer is a trusted proxy), so a client
    behind a trusted proxy is counted as itself, and one that sends its own X-Forwarded-For
    from outside is still counted by its socket address. An IPv6 client is counted by its /64
    (one host usually has the whole block). Per process: each web replica counts on its own,
    so N replicas allow N times the rate."""

    def __init__(self, failures: int = FAILURES, window: float = WINDOW) -> None:
        self.failures = failures
        self.window = window
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    @staticmethod
    def key(client: str) -> str:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._seen.get(self.key(client), deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def retry_after(self, client: str, now: float) -> int:
        """Seconds until `client` may try again (0: now)."""
        if not self.failures:  # no limit
            return 0
        times = self._recent(client, now)
        if len(times) < self.failures:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, client: str, now: float) -> None:
        times = self._recent(client, now)
        times.append(now)
        key = self.key(client)
        self._seen[key] = times
        self._seen.move_to_end(key)
        while len(self._seen) > CLIENTS:
            self._seen.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._seen.pop(self.key(client), None)
