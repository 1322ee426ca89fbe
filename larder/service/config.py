"""Configuration: one frozen, typed object, loaded once and passed down.

Precedence, highest first: command-line flags, ``LARDER_*`` environment variables, the TOML
config file (``--config`` / ``LARDER_CONFIG``), built-in defaults. This module is the only place
in larder that reads ``os.environ`` (the rustc shim keeps its own small config).

Config file keys are the field names below (``listen = "0.0.0.0:8080"``,
``max_upload_size = "8GiB"``); env vars are ``LARDER_`` + the upper-cased field name.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from larder.errors import InvalidInput
from larder.protocol.tokens import parse_ttl

_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


class ConfigError(InvalidInput):
    """A configuration value is malformed; the message names the setting."""

    code = "bad_config"


def parse_size(text: str) -> int:
    """Bytes from ``"1048576"``, ``"64MiB"``, ``"8GB"``, ``"512k"``. Binary units use ``i``."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    number, unit = int(match.group(1)), (match.group(2) or "").upper().removesuffix("B")
    if not unit:
        return number
    base = 1024 if unit.endswith("I") else 1000
    exponent: int = "KMGT".index(unit[0]) + 1
    return int(number * base**exponent)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Config:
    """Everything the server needs to know, validated."""

    listen: str = "127.0.0.1:8080"
    storage: str = "./larder-data"
    # Public base URL clients use (e.g. https://larder.example); default: derived per request.
    public_url: str = ""
    # Largest request body accepted for NAR, artifact and opaque uploads (compressed bytes).
    max_upload_size: int = 16 * 1024**3
    # Largest narinfo / small JSON document accepted.
    max_document_size: int = 1024**2
    # Largest NAR accepted once decompressed, and largest decoded body of an opaque upload
    # sent with a Content-Encoding (max_upload_size counts the bytes as sent).
    max_nar_size: int = 64 * 1024**3
    zstd_level: int = 3
    # Seconds a replica trusts its in-memory view of caches and revoked tokens.
    refresh_interval: float = 10.0
    # Priority advertised in nix-cache-info (lower wins; cache.nixos.org uses 40).
    default_priority: int = 30
    log_level: str = "info"
    # Access log lines: "text" (aiohttp's format) or "json" (one object per line).
    access_log: str = "text"
    # Seconds between scans of stored objects and bytes per cache (0: never).
    usage_interval: float = 600.0
    # A file holding the token secret (64+ hex digits, or 32+ bytes); empty: kept in the store.
    token_secret_file: str = ""
    # Seconds a request body may stall (no byte arriving) before the upload is dropped (408).
    body_idle_timeout: float = 60.0
    # A directory of <cache>.key files (Nix secret keys) that serve adopts at start-up.
    signing_keys_dir: str = ""
    # Seconds between garbage collections run by `serve` (0: never); replicas take turns.
    gc_interval: float = 3600.0
    # Cap on the whole store in bytes (0: none); each cache's own: `larder cache limits`.
    gc_max_size: int = 0
    # Seconds after its last use an object is evicted, in caches without their own (0: never).
    gc_retention: float = 0.0
    # Seconds: what was used (or uploaded) this recently is never evicted, with its closure, and
    # a blob nothing refers to is kept this long. Must exceed clock skew to the storage backend.
    gc_grace: float = 600.0
    # Seconds between writes of the uses this replica recorded (one object per cache).
    use_flush_interval: float = 30.0
    # Seconds a request head (request line and headers) may take to arrive (408 after; 0: off).
    header_timeout: float = 30.0
    # Connections served at once; one more is answered 503 and closed (0: no limit).
    max_connections: int = 1000
    # Server processes sharing the listening socket (0: one per CPU).
    workers: int = 1
    # Event loop of each server process: "uvloop" (faster) or "asyncio" (the standard one).
    event_loop: str = "uvloop"

    def token_secret(self) -> bytes | None:
        """The mounted token secret, if one is configured."""
        if not self.token_secret_file:
            return None
        try:
            text = Path(self.token_secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token_secret_file: {exc}") from None
        try:
            secret = bytes.fromhex(text.decode()) if len(text) >= 64 else text
        except (UnicodeDecodeError, ValueError):
            secret = text
        if len(secret) < 32:
            raise ConfigError("token_secret_file must hold at least 32 bytes (or 64 hex digits)")
        return secret

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def _duration(value: object) -> float:
    """Seconds from a number or from ``30d``, ``12h``, ``15m``, ``90s``."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = float(parse_ttl(text))
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def _at_least(value: Any, low: float) -> Any:
    if value < low:
        raise ValueError(f"{value:g} is less than {low:g}")
    return value


_CONVERTERS: dict[str, Any] = {
    "listen": lambda v: (parse_listen(str(v)), str(v))[1],
    "storage": str,
    "public_url": lambda v: str(v).rstrip("/"),
    "max_upload_size": lambda v: v if isinstance(v, int) else parse_size(str(v)),
    "max_document_size": lambda v: v if isinstance(v, int) else parse_size(str(v)),
    "max_nar_size": lambda v: v if isinstance(v, int) else parse_size(str(v)),
    "zstd_level": int,
    "refresh_interval": float,
    "default_priority": int,
    "log_level": lambda v: _choice(str(v).lower(), ("debug", "info", "warning", "error")),
    "access_log": lambda v: _choice(str(v).lower(), ("text", "json")),
    "usage_interval": float,
    "token_secret_file": str,
    "signing_keys_dir": str,
    "body_idle_timeout": float,
    "gc_interval": _duration,
    "gc_max_size": lambda v: v if isinstance(v, int) else parse_size(str(v)),
    "gc_retention": _duration,
    "gc_grace": lambda v: _at_least(_duration(v), 1.0),
    "use_flush_interval": lambda v: _at_least(_duration(v), 0.1),
    "header_timeout": lambda v: _non_negative(float(v)),
    "max_connections": lambda v: _non_negative(int(v)),
    "workers": lambda v: _at_least(int(v), 0),
    "event_loop": lambda v: _choice(str(v).lower(), ("uvloop", "asyncio")),
}


def _non_negative(value: Any) -> Any:
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _choice(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _convert(name: str, value: object, source: str) -> Any:
    try:
        return _CONVERTERS[name](value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: bad value for {name}: {exc}") from None


def load_config(
    flags: Mapping[str, object | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge flags > env > file > defaults into a validated :class:`Config`.

    ``flags`` holds command-line values by field name (``None`` = not given) plus an optional
    ``config`` entry naming the TOML file; ``environ`` defaults to ``os.environ``.
    """
    flags = dict(flags or {})
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = flags.pop("config", None) or env.get("LARDER_CONFIG")
    if config_file:
        path = Path(str(config_file))
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        for key, value in document.items():
            if key not in _CONVERTERS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = _convert(key, value, str(path))
    for field in fields(Config):
        raw = env.get(f"LARDER_{field.name.upper()}")
        if raw is not None and raw != "":
            values[field.name] = _convert(field.name, raw, f"LARDER_{field.name.upper()}")
    for name, value in flags.items():
        if value is not None:
            if name not in _CONVERTERS:
                raise ConfigError(f"unknown flag {name!r}")
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}")
    return Config(**values)
