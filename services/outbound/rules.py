"""What a webhook endpoint may be: one set of rules for the admin API, the
configuration file and the sender, so an endpoint refused through one is
refused through all.

- `url_problem`: an absolute https URL (http only to a loopback host with
  `allow_http`), with no credentials, fragment, whitespace, control or
  formatting characters, and a host that is an IP address or a DNS name
  (labels of 1-63 characters, 253 in all, IDNA for non-ASCII names).
- `public` / `address_problem`: whether an address (or a host given as an
  address) is public. An IPv6 address that carries an IPv4 one (mapped,
  NAT64, 6to4, Teredo, ...) is only as public as the IPv4 address in it.
- `events_problem`: the message types an endpoint may subscribe to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from typing import get_args
from urllib.parse import urlsplit

from yarl import URL

from contracts.events import EventType

#: The longest endpoint URL (as the API's body allows).
MAX_URL = 2000
#: Every message type an endpoint can receive.
MESSAGE_TYPES = frozenset({*get_args(EventType), "order.created", "ping"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

# A label neither starts nor ends with a hyphen (RFC 952, RFC 1123 2.1).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: NAT64 for local use (RFC 8215): translates to whatever the site says.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
#: IPv4-compatible (deprecated, RFC 4291) and IPv4-translated (SIIT) addresses.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")


def _v4_public(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not ip.is_multicast


def public(address: str) -> bool:
    """Whether connecting to `address` reaches the public internet."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_public(ip)
    if ip in _NAT64_LOCAL or ip in _IPV4_COMPATIBLE:
        return False
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return _v4_public(ip.ipv4_mapped)
    if ip in _IPV4_TRANSLATED or ip in _NAT64:
        return _v4_public(low)
    carried = [ip.sixtofour] if ip.sixtofour is not None else []
    if ip.teredo is not None:
        carried += list(ip.teredo)
    return ip.is_global and not ip.is_multicast and all(_v4_public(v4) for v4 in carried)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    ip = _literal(host)
    return ip is not None and ip.is_loopback


def address_problem(host: str) -> str | None:
    """Why `host`, an IP address or a loopback name, is not public; None
    for a public address and for any other name (where a name resolves is
    the `Resolver`'s question)."""
    ip = _literal(host)
    if host.lower() in LOOPBACK_NAMES or (ip is not None and not public(str(ip))):
        return f"{host} is a non-public address; outbound.allow_private_networks allows it"
    return None


def _host_problem(host: str) -> str | None:
    """Why `host` (urlsplit's hostname: lower case, no brackets) is neither
    an IP address nor a DNS name a resolver would take."""
    if "%" in host:
        return "the URL's host must not be percent-encoded or carry an IPv6 zone"
    if _literal(host) is not None:
        return None
    name = host
    if not host.isascii():
        try:
            name = URL.build(scheme="https", host=host).raw_host or ""
        except (ValueError, UnicodeError):
            return "the URL's host is not a valid international domain name (IDNA)"
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        return "the URL's host is no DNS name: labels of 1 to 63 characters, 253 in all"
    if not all(_LABEL.fullmatch(label) for label in labels):
        return (
            "the URL's host may hold letters, digits, '-' and '_' only,"
            " each label starting and ending with a letter or digit"
        )
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        # 0x7f.1 or 2130706433 would reach 127.0.0.1 through getaddrinfo.
        return "the URL's host looks like an IPv4 address but is not one (a.b.c.d)"
    return None


def _odd_character(url: str) -> bool:
    """Whitespace, a control character (CR, LF, NUL), or an invisible
    formatting one (bidi overrides, zero-width spaces) anywhere."""
    return any(unicodedata.category(c)[0] in "CZ" for c in url)


@functools.lru_cache(maxsize=1024)
def url_problem(url: str, allow_http: bool) -> str | None:
    """Why `url` cannot be an endpoint's address, or None (see the module's
    docstring). Where its host resolves is checked separately, before every
    attempt (`services.outbound.webhooks.Resolver`)."""
    if len(url) > MAX_URL:
        return f"the URL is longer than {MAX_URL} characters"
    if _odd_character(url):
        return (
            "the URL must not contain whitespace, control or formatting characters"
            " (percent-encode them in the path or query)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"the URL is not valid: {exc}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "the URL must be absolute, https://host/path"
    if "@" in parts.netloc:
        return "the URL must not carry credentials"
    if parts.fragment or url.endswith("#"):
        return "the URL must not have a #fragment"
    if port == 0:
        return "the URL's port must not be 0"
    problem = _host_problem(parts.hostname)
    if problem is not None:
        return problem
    if parts.scheme == "http":
        if not allow_http:
            return "the URL must be https (outbound.allow_http allows http to loopback)"
        if not loopback(parts.hostname):
            return "http is only allowed to a loopback host; use https"
    return None


def events_problem(events: list[str] | None) -> str | None:
    """Why `events` is no subscription, or None: each a message type, ``*``,
    or a prefix of one ending in ``.*`` (``entitlement.*``)."""
    for name in events or []:
        if name == "*" or name in MESSAGE_TYPES:
            continue
        if name.endswith(".*") and any(k.startswith(name[:-1]) for k in MESSAGE_TYPES):
            continue
        return (
            f"events: {name[:100]!r} is no message type; types are"
            f" {', '.join(sorted(MESSAGE_TYPES))}, or a prefix such as entitlement.*"
        )
    return None


def endpoint_problem(
    url: str, events: list[str] | None, allow_http: bool, allow_private: bool
) -> str | None:
    """Why an endpoint declared with `url` and `events` cannot be, without
    looking a name up (`address_problem` for addresses and loopback names)."""
    problem = url_problem(url, allow_http)
    if problem is None and not allow_private:
        problem = address_problem(urlsplit(url).hostname or "")
    return problem or events_problem(events)
