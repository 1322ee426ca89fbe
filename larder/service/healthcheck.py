"""``python -m larder.service.healthcheck [--config FILE]``: exit 0 if ``GET /healthz`` answers
on the listen address the server is configured with, 1 (saying why) if not, a config that
cannot be read or a bad command line included (Docker reserves 2 for a health check).

The image's ``HEALTHCHECK`` runs it every 30 s beside the server, under the same CPU limit, so
it reads only ``listen`` (``LARDER_LISTEN``, else the config file's, else the defaults file's,
else the default) and loads nothing of the server: no aiohttp, no storage backends. It never
goes through a proxy.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from larder.service.config import (
    DEFAULTS_ENV,
    Config,
    ConfigError,
    format_listen,
    parse_listen,
    read_toml,
)

TIMEOUT = 2.0  # seconds; the image's HEALTHCHECK allows 3


def listen_address(environ: Mapping[str, str], config_file: str | None = None) -> str:
    """``listen`` as ``larder serve`` would read it without flags."""
    listen = environ.get("LARDER_LISTEN")
    files = (
        (config_file or environ.get("LARDER_CONFIG"), "config file"),
        (environ.get(DEFAULTS_ENV), f"defaults file ({DEFAULTS_ENV})"),
    )
    for path, what in files:
        if not listen and path:
            value = read_toml(Path(path), what).get("listen")
            listen = value if isinstance(value, str) else None
    return listen or Config().listen


def local_url(listen: str) -> str:
    """The listen address as a URL to reach it from here (a wildcard address: loopback)."""
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{format_listen(host, port)}"


def probe(listen: str) -> int:
    """``GET /healthz`` on ``listen``: 0 if it answered 2xx, else 1 (the reason on stderr)."""
    url = f"{local_url(listen)}/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=TIMEOUT) as answer:
            answer.read()
    except (OSError, ValueError) as exc:
        print(f"larder: {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_file = args[1] if args[:1] == ["--config"] and len(args) == 2 else None
    if args and config_file is None:
        print("usage: python -m larder.service.healthcheck [--config FILE]", file=sys.stderr)
        return 1
    import os

    try:
        listen = listen_address(os.environ, config_file)
    except ConfigError as exc:  # in the words any larder command stops with on a bad config
        print(f"larder: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"larder: cannot read the listen address: {exc}", file=sys.stderr)
        return 1
    return probe(listen)


if __name__ == "__main__":
    sys.exit(main())
