"""The proxy a request to the cache goes through, from ``https_proxy``/``http_proxy``/``no_proxy``.

The rules are urllib's (``urllib.request.getproxies_environment`` and
``proxy_bypass_environment``), written out here because importing ``urllib.request`` costs the
shim tens of milliseconds on every rustc call:

* ``<scheme>_proxy`` picks the proxy for an ``http`` or ``https`` cache URL; the lower-case name
  wins over the upper-case one, an empty lower-case value unsets it, and ``HTTP_PROXY`` is
  ignored when ``REQUEST_METHOD`` is set (a CGI environment, CVE-2016-1000110).
* ``no_proxy`` is ``*`` (never a proxy) or a comma-separated list of host names or domain
  suffixes (a leading dot is ignored; ``example.com`` covers ``a.example.com``), matched without
  case against the host, with or without its port.

Only ``http://`` proxies are spoken to (a URL without a scheme is one): an https cache goes
through them in a ``CONNECT`` tunnel, an http cache with absolute-form request targets. Credentials
in the proxy URL are sent as ``Proxy-Authorization: Basic``.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote, urlsplit


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header value


def proxies_from(environ: dict[str, str]) -> dict[str, str]:
    """Scheme (and ``no``) -> value, as ``urllib.request.getproxies_environment`` finds them."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        name = name.lower()
        if value and name[-6:] == "_proxy":
            found[name[:-6]] = value
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name[-6:] == "_proxy":
            name = name.lower()
            if value:
                found[name[:-6]] = value
            else:
                found.pop(name[:-6], None)
    return found


def bypassed(host: str, no_proxy: str | None) -> bool:
    """Whether ``host`` (``name`` or ``name:port``) is exempt by ``no_proxy``."""
    if no_proxy is None:
        return False
    if no_proxy == "*":
        return True
    host = host.lower()
    before, colon, port = host.rpartition(":")
    hostonly = before if colon and port.isascii() and (port.isdigit() or not port) else host
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if name and (
            hostonly == name
            or host == name
            or hostonly.endswith("." + name)
            or host.endswith("." + name)
        ):
            return True
    return False


def proxy_for(scheme: str, netloc_host: str, environ: dict[str, str]) -> Proxy | None:
    """The proxy for a request to ``scheme://netloc_host`` (``host`` or ``host:port``), if any.

    Raises ``ValueError`` for a proxy URL that is not ``http://[user:password@]host[:port]``.
    """
    found = proxies_from(environ)
    url = found.get(scheme)
    if url is None or bypassed(netloc_host, found.get("no")):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{scheme}_proxy must be http://HOST[:PORT]: {url!r}")
    authorization = None
    if parts.username is not None:
        import base64

        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization)
