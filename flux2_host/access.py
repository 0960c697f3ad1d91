"""Who may use the server: the checks every request passes before any route sees it.

A web page on another site must not drive a server on this machine through the visitor's browser, and a
server reachable beyond loopback must not serve whoever finds the port. So, for every request:

- Host allow-list (against DNS rebinding: an attacker's name that resolves to 127.0.0.1 makes the browser
  treat the server as the attacker's own site): the Host header must name a loopback name, the listen
  address, an IP literal the server is reached by, or a name added with `--allow-host`.
- `Sec-Fetch-Site: cross-site` is refused (a link followed to the canvas, a top-level navigation, is allowed).
- Every state-changing request (POST, PUT, DELETE, PATCH) and every WebSocket upgrade whose Origin names
  another host than the Host header is refused, whatever the Host is.
- With an auth token, every route and the WebSocket need it: `Authorization: Bearer TOKEN`, the cookie the
  server sets when the canvas is opened once with `?token=TOKEN`, or `?token=TOKEN` itself.

None of this depends on how the Host header spells "local" (the old check ran only for four loopback
spellings of Host): the Origin check runs on every state-changing request.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .json_api import json_error

log = logging.getLogger("flux2.server")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
TOKEN_COOKIE = "flux2_token"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_loopback_address(text: str) -> bool:
    """127.0.0.0/8, ::1 and the IPv4-mapped form of a loopback address; 'localhost' too."""
    if text.lower() == "localhost":
        return True
    address = _ip(text.strip("[]"))
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def is_wildcard_address(text: str) -> bool:
    address = _ip(text.strip("[]"))
    return address is not None and address.is_unspecified


@dataclass
class AccessPolicy:
    """What `flux2 serve` was told: where it listens, extra Host names, and the token (None: none needed)."""

    listen_host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    auth_token: str | None = None

    @property
    def beyond_loopback(self) -> bool:
        return not is_loopback_address(self.listen_host)

    def host_allowed(self, host_name: str) -> bool:
        name = host_name.lower()
        if name in LOOPBACK_NAMES or name in self.allowed_hosts or name == self.listen_host.lower().strip("[]"):
            return True
        address = _ip(name)
        if address is None:
            return False  # a DNS name nobody listed: what a rebinding attack sends
        # An IP literal cannot be rebound: loopback ones, and any one when listening on every interface.
        return is_loopback_address(name) or is_wildcard_address(self.listen_host)

    def token_ok(self, request: web.Request) -> bool:
        if self.auth_token is None:
            return True
        given = request.headers.get("Authorization", "")
        candidates = [given[7:] if given[:7].lower() == "bearer " else "",
                      request.cookies.get(TOKEN_COOKIE, ""), request.query.get("token", "")]
        expected = self.auth_token.encode()
        return any(hmac.compare_digest(candidate.encode(), expected) for candidate in candidates)


def _host_and_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + netloc)
    return (parts.hostname or ""), (parts.port or DEFAULT_PORTS.get(scheme))


def refusal(policy: AccessPolicy, request: web.Request) -> tuple[int, str, str] | None:
    """(status, error type, message) when the request must be refused, else None."""
    host = request.headers.get("Host")
    scheme = "https" if request.secure else "http"
    try:
        host_name, host_port = _host_and_port(host, scheme) if host else ("", None)
    except ValueError:
        return 403, "host_refused", f"Host {host!r} is not a host name"
    if host is not None and not policy.host_allowed(host_name):
        return 403, "host_refused", (f"Host {host!r} is not one this server answers to; add it with "
                                     f"--allow-host if it is yours")
    is_websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    navigation = (request.method in ("GET", "HEAD") and not is_websocket
                  and request.headers.get("Sec-Fetch-Mode") == "navigate")
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site" and not navigation:
        return 403, "cross_site", "cross-site requests are refused (Sec-Fetch-Site: cross-site)"
    origin = request.headers.get("Origin")
    if origin is not None and (request.method in STATE_CHANGING_METHODS or is_websocket):
        parts = urlsplit(origin)
        try:
            same = (parts.scheme in ("http", "https") and host is not None
                    and _host_and_port(parts.netloc, parts.scheme) == (host_name, host_port))
        except ValueError:
            same = False
        if not same:
            return 403, "origin_mismatch", f"Origin {origin} does not match Host {host}"
    if not policy.token_ok(request):
        return 401, "unauthorized", "this server needs its auth token (Authorization: Bearer TOKEN or ?token=TOKEN)"
    return None


def access_guard(policy: AccessPolicy):
    """The middleware applying `policy` to every request; a browser that opens the canvas with ?token= gets
    the token as a cookie, so the canvas's own requests and WebSocket carry it."""

    @web.middleware
    async def guard(request: web.Request, handler):
        refused = refusal(policy, request)
        if refused is not None:
            return json_error(*refused)
        response = await handler(request)
        if policy.auth_token is not None and request.query.get("token") and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, request.query["token"], httponly=True, samesite="Strict",
                                secure=request.secure)
        return response

    return guard


def policy_from_args(args) -> AccessPolicy:
    """The policy `flux2 serve` was given; warns when the server is reachable beyond loopback without a
    token or TLS (anyone who reaches the port can then run prompts and read every output)."""
    token = args.auth_token
    if args.auth_token_file:
        with open(args.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file}: expected a token, found an empty file")
    policy = AccessPolicy(listen_host=args.host, auth_token=token or None,
                          allowed_hosts=frozenset(name.lower() for name in args.allow_host))
    if policy.beyond_loopback and policy.auth_token is None:
        log.warning("WARNING: serving on %s, beyond loopback, without --auth-token: anyone who can reach this "
                    "port can run prompts and read every output", args.host)
    if policy.beyond_loopback and not args.tls_certfile:
        log.warning("WARNING: serving on %s, beyond loopback, without TLS (--tls-certfile/--tls-keyfile): "
                    "prompts, images and the token cross the network in clear text", args.host)
    return policy


def ssl_context_from_args(args) -> ssl.SSLContext | None:
    if not args.tls_certfile and not args.tls_keyfile:
        return None
    if not (args.tls_certfile and args.tls_keyfile):
        raise ValueError("TLS needs both --tls-certfile and --tls-keyfile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_certfile, args.tls_keyfile)
    return context
