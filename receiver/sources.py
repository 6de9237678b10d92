"""Which hosts may deliver notifications: an optional allow list of networks.

The signature already proves who wrote a notification; the allow list is defence in depth
(PagoEfectivo sends from known ranges) and keeps strangers from making the receiver spend
CPU on HMACs. It is off unless ``RECEIVER_ALLOWED_CIDRS`` is set.

Behind a reverse proxy the TCP peer is the proxy, and the sender's address is in
``X-Forwarded-For``, where anyone can write anything. So that header is believed only when
the direct peer is one of ``RECEIVER_TRUSTED_PROXIES``, and then only its right-most
address that is not itself a trusted proxy: the left part is whatever the client claimed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from prometheus_client import Counter

from refunds.errors import ConfigError

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
FORWARDED_FOR = "X-Forwarded-For"

refused_total = Counter(
    "refund_notifications_refused_total",
    "Notifications refused before they were read (reason=source: sender not in RECEIVER_ALLOWED_CIDRS)",
    ["reason"],
)
refused_total.labels("source")  # at 0 from the start, so the first refusal shows in increase()


def parse_networks(text: str | None, setting: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128); ConfigError names ``setting``."""
    networks = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{setting} is malformed: {part!r} is not an IP network") from None
    return tuple(networks)


def parse_address(text: str | None) -> Address | None:
    """An address as peers and proxies write it: ``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``, ``::1``."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port (an IPv6 address has at least two colons)
        text = text.partition(":")[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
    return address


@dataclass(frozen=True)
class SourcePolicy:
    allowed: tuple[Network, ...] = ()          # empty: every source is allowed
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, allowed_cidrs: str | None, trusted_proxies: str | None) -> SourcePolicy:
        return cls(parse_networks(allowed_cidrs, "RECEIVER_ALLOWED_CIDRS"),
                   parse_networks(trusted_proxies, "RECEIVER_TRUSTED_PROXIES"))

    @property
    def active(self) -> bool:
        return bool(self.allowed)

    def client(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> Address | None:
        """The sender's address, or None when it cannot be known (unreadable peer or hop)."""
        address = parse_address(peer)
        if address is None or not self._trusted(address):
            return address
        hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
        for hop in reversed([hop for hop in hops if hop]):
            address = parse_address(hop)
            if address is None:
                return None  # a proxy of ours wrote something we cannot read: do not guess
            if not self._trusted(address):
                return address
        return address  # only trusted proxies all the way: the left-most of them sent it

    def allows(self, address: Address | None) -> bool:
        if not self.allowed:
            return True
        return address is not None and any(address in network for network in self.allowed)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted_proxies)
