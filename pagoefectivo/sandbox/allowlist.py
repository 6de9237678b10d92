"""The gateway's source-IP allow list (code 607), global and per merchant.

PagoEfectivo registers the addresses a merchant calls from; a call from elsewhere is refused.
An empty list means "no restriction", so the default sandbox accepts any caller. Lists are
kept as normalized CIDR strings (they are shown by ``GET /sandbox/chaos``) and parsed into
networks once, on first use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(value: Any) -> tuple[str, ...]:
    """``"10.0.0.0/8,127.0.0.1"`` or ``["10.0.0.0/8", ...]`` → normalized CIDRs; ValueError names the bad one."""
    if isinstance(value, str):
        items: Iterable[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError('must be a list of CIDRs or "CIDR,CIDR"')
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not a CIDR string")
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(out)


@lru_cache(maxsize=256)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


def permits(cidrs: tuple[str, ...], remote: str | None) -> bool:
    """Whether the caller's address is inside the list (an empty list permits everyone)."""
    if not cidrs:
        return True
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(cidrs))
