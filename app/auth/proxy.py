"""Sign-in through a trusted reverse proxy: who the proxy's headers name, and whether to believe them.

A proxy in front of the app (oauth2-proxy, an SSO gateway, nginx with auth_request) signs people in
and names them in headers. Anyone who reaches the app directly could send the same headers, so they
count only on connections whose direct peer is one of TRUSTED_PROXY_ADDRESSES. The peer is the TCP
address the server accepted, recorded before X-Forwarded-For is applied (`DIRECT_PEER`, set by
app.main's DirectPeer middleware): a forwarded address never makes a request trusted.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.auth.service import ExternalIdentity, parse_groups
from app.config import Settings
from app.models import SignInMethod

log = logging.getLogger(__name__)

# The ASGI scope key holding the connection's own (host, port), before any forwarded headers.
DIRECT_PEER = "pgpt.direct_peer"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedProxy:
    networks: Sequence[Network]
    user_header: str
    name_header: str
    groups_header: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustedProxy | None:
        if not settings.trusted_proxy_addresses:
            return None
        return cls(
            networks=tuple(settings.trusted_proxy_addresses),
            user_header=settings.proxy_user_header,
            name_header=settings.proxy_name_header,
            groups_header=settings.proxy_groups_header,
        )

    def trusts(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket path, or a test client's made-up name
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def identity(self, peer: str | None, headers: Mapping[str, str]) -> ExternalIdentity | None:
        """The person the headers name, if the peer is a trusted proxy and names anyone."""
        email = headers.get(self.user_header, "").strip()
        if not email:
            return None
        if not self.trusts(peer):
            # Worth a line in the log: either a misconfigured proxy list or someone trying it on.
            log.warning("ignored %s from %s, which is not in TRUSTED_PROXY_ADDRESSES", self.user_header, peer)
            return None
        return ExternalIdentity(
            email=email,
            display_name=headers.get(self.name_header, "").strip() if self.name_header else "",
            groups=parse_groups(headers.get(self.groups_header, "")) if self.groups_header else (),
            method=SignInMethod.PROXY,
        )
