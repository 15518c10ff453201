"""Who may talk to the server: Host allow-list (DNS rebinding), browser origin checks (CSRF from any
web page the operator visits), bearer API keys, and model control (load/unload/index) restricted
on its own, as Triton's ``--http-restricted-api`` does.

One ASGI middleware in front of every route; a refusal is answered before the route runs:
403 for a foreign Host or a cross-origin browser request or disabled model control, 401 (with
``WWW-Authenticate: Bearer``) for a missing or wrong key. Keys are compared in constant time and
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from modelkiln.errors import ConfigError

log = logging.getLogger(__name__)
API_KEY_ENV = "KILN_API_KEY"
ADMIN_KEY_ENV = "KILN_ADMIN_KEY"
HEALTH = ("/v2/health/live", "/v2/health/ready")
MODEL_CONTROL = "/v2/repository/"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BROWSER_SITES = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of a foreign page


@dataclass(frozen=True)
class Security:
    """Access rules of a server. The defaults (no key) suit the default loopback bind only."""

    #: Every route but health needs ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    #: Model control (load, unload, repository index) needs this key instead (None: the API key).
    admin_key: str | None = None
    #: False: model control answers 403 whatever the key (like Triton's model-control-mode none).
    model_control: bool = True
    #: Host names accepted besides the bound address (and loopback names on a loopback bind);
    #: "*" accepts any Host.
    allowed_hosts: tuple[str, ...] = ()
    #: Browser origins (``https://app.example.com``) allowed to call; "*" allows any.
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("api_key", "admin_key"):
            key = getattr(self, name)
            if key is not None and (len(key) < 8 or not key.isascii() or not key.isprintable() or " " in key):
                raise ConfigError(f"{name} must be at least 8 printable ASCII characters without spaces")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower().rstrip(".") for h in self.allowed_hosts))
        object.__setattr__(
            self, "allowed_origins", tuple(o.rstrip("/").lower() for o in self.allowed_origins)
        )


def read_key(path: str | Path | None, env: str = API_KEY_ENV) -> str | None:
    """A key from a file (first line, stripped) or else the environment variable ``env``."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ConfigError(f"the key file {path} is empty")
        return key
    return os.environ.get(env) or None


def host_allowed(host_header: str | None, bound: str, security: Security) -> bool:
    """Whether a request's Host names this server: the bound address, a loopback name when bound
    to loopback, any IP literal when bound to every interface, or a configured name."""
    if host_header is None or "*" in security.allowed_hosts:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = _hostname(host_header)
    if name is None:
        return False
    if name == _hostname(bound) or name in security.allowed_hosts:
        return True
    ip = parse_ip(bound)
    if ip is not None and ip.is_unspecified:  # 0.0.0.0 / ::: every address of the machine
        return name in LOOPBACK_NAMES or parse_ip(name) is not None
    return ip is not None and ip.is_loopback and name in LOOPBACK_NAMES


def origin_allowed(headers: Headers, security: Security) -> bool:
    """Browsers say where a request comes from; a page on another origin may not drive the server
    (a ``text/plain`` POST needs no CORS preflight, so refusing it is the only defence)."""
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site", "").lower()
    if origin is None and site not in BROWSER_SITES:
        return True
    if "*" in security.allowed_origins or (origin or "").rstrip("/").lower() in security.allowed_origins:
        return True
    if origin is not None and site not in BROWSER_SITES:  # same origin: a page this host serves
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # "http://[::1" and the like
            return False
        return bool(netloc) and netloc == headers.get("host", "").lower()
    return False


def key_matches(headers: Headers, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time (digests of equal length)."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    a = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(a, hashlib.sha256(key.encode()).digest())


class SecurityMiddleware:
    """Host, origin, key and model-control checks before any route runs."""

    def __init__(self, app: Any, security: Security, bound: str) -> None:
        self.app, self.security, self.bound = app, security, bound

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        refusal = None
        if scope["type"] == "http":
            refusal = self.check(scope["path"], Headers(scope=scope), scope.get("method", ""))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message = refusal
        await _refuse(scope["path"], status, message)(scope, receive, send)

    def check(self, path: str, headers: Headers, method: str = "GET") -> tuple[int, str] | None:
        """(status, message) of a refusal, or None to let the request through."""
        sec = self.security
        if not host_allowed(headers.get("host"), self.bound, sec):
            return 403, "this Host is not served here (kiln serve --allowed-host NAME allows a name)"
        if not origin_allowed(headers, sec):
            return 403, "cross-origin browser requests are refused (kiln serve --allowed-origin allows one)"
        if path in HEALTH or _preflight(method, headers, sec):
            return None  # a CORS preflight carries no key; CORSMiddleware answers it
        if path.startswith(MODEL_CONTROL):
            if not sec.model_control:
                return 403, "model control (load, unload, repository index) is disabled on this server"
            key = sec.admin_key or sec.api_key
            if key is not None and not key_matches(headers, key):
                return 401, "model control needs the admin key: Authorization: Bearer <key>"
            return None
        if sec.api_key is not None and not key_matches(headers, sec.api_key):
            return 401, "missing or wrong API key: send Authorization: Bearer <key>"
        return None


def _preflight(method: str, headers: Headers, security: Security) -> bool:
    """A browser's CORS preflight from an allowed origin (it may not carry credentials)."""
    return (
        method == "OPTIONS"
        and bool(security.allowed_origins)
        and "origin" in headers
        and "access-control-request-method" in headers
    )


def cors(app: Any, security: Security) -> Any:
    """``app`` answering CORS for the allowed origins (none: unchanged, browsers get no access)."""
    if not security.allowed_origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=list(security.allowed_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type", "inference-header-content-length"],
        expose_headers=["inference-header-content-length"],
        max_age=600,
    )


def _refuse(path: str, status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if path.startswith("/v1/"):  # OpenAI's error shape for OpenAI's routes
        kind = "authentication_error" if status == 401 else "permission_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _hostname(host: str) -> str | None:
    """The name part of a Host header or bind address (``[::1]:8000`` -> ``::1``), lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    if host.count(":") > 1:  # a bare IPv6 address (a bind address, never a valid Host header)
        return host
    return host.partition(":")[0].rstrip(".") or None


def parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(_hostname(name) or "")
    except ValueError:
        return None
