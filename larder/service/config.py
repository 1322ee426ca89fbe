"""Configuration: one frozen, typed object, loaded once and passed down.

Precedence, highest first: command-line flags, ``LARDER_*`` environment variables, the TOML
config file (``--config`` / ``LARDER_CONFIG``), a TOML defaults file (``LARDER_DEFAULTS``: the
container image's own defaults, so that a mounted config file overrides them; named and
missing, an error as a missing config file is), built-in defaults. This module is the only
place in larder that reads ``os.environ`` (the rustc shim keeps its own small config).

Config file keys are the field names below (``listen = "0.0.0.0:8080"``,
``max_upload_size = "8GiB"``); env vars are ``LARDER_`` + the upper-cased field name.
Every field carries its parser in its metadata (``_setting(default, parser)``): flags, env vars
and file values all go through it, so a new field cannot lack one.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from larder.errors import InvalidInput, LarderError

if TYPE_CHECKING:
    from larder.protocol.forwarded import Network

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


def format_listen(host: str, port: int) -> str:
    """``HOST:PORT`` as :func:`parse_listen` reads it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


#: A field's metadata key for the function that turns a flag, env or TOML value into its value.
PARSE = "parse"
T = TypeVar("T")


def _setting(default: T, parse: Callable[[Any], T]) -> T:
    """A :class:`Config` field with its default and the parser every source goes through."""
    return field(default=default, metadata={PARSE: parse})


def _listen(value: object) -> str:
    text = _text(value)
    parse_listen(text)
    return text


def _text(value: object) -> str:
    """A string setting (TOML must give a string: a list would become a path like ``['a']``)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _storage(value: object) -> str:
    # Imported when used: the image's health check loads this module every 30 s.
    from larder.storage.factory import check_storage_url

    return check_storage_url(_text(value))


def _url(value: object) -> str:
    """A base URL clients can use: ``http`` or ``https``, a host, no query (``""``: none)."""
    text = _text(value).strip().rstrip("/")
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not one
    except ValueError as exc:
        raise ValueError(f"not a URL: {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"{text!r} has a query or fragment; give the base URL only")
    return text


def _whole(value: object) -> int:
    """An integer from TOML or a string; never a bool or a float (``1.9`` is not ``1``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a whole number")
    return value if isinstance(value, int) else int(value.strip())


def _integer(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        number = _whole(value)
        if not low <= number <= high:
            raise ValueError(f"{number} is not within {low}-{high}")
        return number

    return parse


def _size_at_least(low: int) -> Callable[[object], int]:
    """Bytes from a TOML integer or a size string (:func:`parse_size`), at least ``low``."""

    def parse(value: object) -> int:
        size = parse_size(value) if isinstance(value, str) else _whole(value)
        if size < low:
            raise ValueError(f"{size} is less than {low}")
        return size

    return parse


def _duration(value: object) -> float:
    """Seconds, finite and not negative, from a number or from ``30d``, ``12h``, ``15m``,
    ``90s``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            from larder.protocol.tokens import parse_ttl  # imported when used, as above

            seconds = float(parse_ttl(text))
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def _duration_at_least(low: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = _duration(value)
        if seconds < low:
            raise ValueError(f"{seconds:g} is less than {low:g}")
        return seconds

    return parse


def _cache_names(value: object) -> str:
    """Cache names from a TOML list of strings or a comma-separated string (the environment),
    kept comma-separated."""
    from larder.protocol.names import check_cache_name  # imported when used, as above

    if isinstance(value, str):
        items: list[object] = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"{value!r} is not a list of cache names")
    try:
        return ",".join(dict.fromkeys(check_cache_name(_text(item)) for item in items))
    except LarderError as exc:
        raise ValueError(exc.message) from None


def _networks(value: object) -> str:
    """Addresses or CIDR blocks from a TOML list of strings or a comma-separated string (the
    environment), kept comma-separated."""
    from larder.protocol.forwarded import parse_networks  # imported when used, as above

    if isinstance(value, list):
        value = ",".join(_text(item) for item in value)
    text = _text(value)
    return ",".join(str(network) for network in parse_networks(text))


def _one_of(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).lower()
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return parse


#: The most server processes ``workers`` may ask for (a typo such as 100000 would fork them all).
MAX_WORKERS = 256


@dataclass(frozen=True)
class Config:
    """Everything the server needs to know, validated."""

    listen: str = _setting("127.0.0.1:8080", _listen)
    storage: str = _setting("./larder-data", _storage)
    # Public base URL clients use (e.g. https://larder.example); default: derived per request.
    public_url: str = _setting("", _url)
    # Largest request body accepted for NAR, artifact and opaque uploads (compressed bytes).
    max_upload_size: int = _setting(16 * 1024**3, _size_at_least(1))
    # Largest narinfo / small JSON document accepted.
    max_document_size: int = _setting(1024**2, _size_at_least(1))
    # Largest NAR accepted once decompressed, and largest decoded body of an opaque upload or
    # rustc output sent with a Content-Encoding (max_upload_size counts the bytes as sent).
    max_nar_size: int = _setting(64 * 1024**3, _size_at_least(1))
    zstd_level: int = _setting(3, _integer(1, 22))
    # Seconds an S3 request waits for the next bytes of an answer, per attempt (3 attempts): a
    # hung endpoint fails a storage call after about 3x this; /readyz answers 503 within 5 s.
    storage_timeout: float = _setting(15.0, _duration_at_least(1.0))
    # Seconds a replica trusts its in-memory view of caches and revoked tokens.
    refresh_interval: float = _setting(10.0, _duration)
    # Priority advertised in nix-cache-info (lower wins; cache.nixos.org uses 40).
    default_priority: int = _setting(30, _integer(0, 2**31 - 1))
    log_level: str = _setting("info", _one_of("debug", "info", "warning", "error"))
    # Access log lines: "text" (aiohttp's format) or "json" (one object per line, with a UTC
    # "time", nothing before it: JSON lines).
    access_log: str = _setting("text", _one_of("text", "json"))
    # Seconds between scans of stored objects and bytes per cache (0: never).
    usage_interval: float = _setting(600.0, _duration)
    # A file holding the token secret (64+ hex digits, or 32+ bytes); empty: kept in the store.
    token_secret_file: str = _setting("", _text)
    # Seconds a request body may stall (no byte arriving) before the upload is dropped (408).
    body_idle_timeout: float = _setting(60.0, _duration_at_least(1.0))
    # A directory of <cache>.key files (Nix secret keys) that serve adopts at start-up.
    signing_keys_dir: str = _setting("", _text)
    # Caches that serve makes sure exist and are private at start-up (a list, or comma-separated
    # in LARDER_PRIVATE_CACHES); leaving a cache out never makes it public (`larder cache set`).
    private_caches: str = _setting("", _cache_names)
    # Proxies whose X-Forwarded-For is believed for the access log's client address (a list of
    # addresses or CIDR blocks, or comma-separated in LARDER_TRUSTED_PROXIES; empty: none).
    trusted_proxies: str = _setting("", _networks)
    # Seconds between garbage collections run by `serve` (0: never); replicas take turns.
    gc_interval: float = _setting(3600.0, _duration)
    # Cap on the whole store in bytes (0: none); each cache's own: `larder cache limits`.
    gc_max_size: int = _setting(0, _size_at_least(0))
    # Seconds after its last use an object is evicted, in caches without their own (0: never).
    gc_retention: float = _setting(0.0, _duration)
    # Seconds: what was used (or uploaded) this recently is never evicted, with its closure, and
    # a blob nothing refers to is kept this long. Must exceed clock skew to the storage backend.
    gc_grace: float = _setting(600.0, _duration_at_least(1.0))
    # Seconds between writes of the uses this replica recorded (one object per cache).
    use_flush_interval: float = _setting(30.0, _duration_at_least(0.1))
    # Seconds a request head (request line and headers) may take to arrive (408 after; 0: off).
    header_timeout: float = _setting(30.0, _duration)
    # Connections each server process serves at once (with `workers` > 1 the server holds up to
    # workers x this); one more reaching a process is answered 503 and closed (0: no limit).
    max_connections: int = _setting(1000, _integer(0, 10**6))
    # Server processes sharing the listening socket (0: one per CPU the process may use, within
    # a cgroup v2 CPU quota such as a container's CPU limit, rounded up).
    workers: int = _setting(1, _integer(0, MAX_WORKERS))
    # Seconds a worker's event loop may go without a heartbeat before the parent kills and
    # replaces it (with workers > 1).
    worker_timeout: float = _setting(30.0, _duration_at_least(1.0))
    # Event loop of each server process: "uvloop" (faster) or "asyncio" (the standard one).
    event_loop: str = _setting("uvloop", _one_of("uvloop", "asyncio"))

    def mounted_token_secret(self) -> Callable[[], bytes] | None:
        """What reads the mounted token secret, if one is configured; the file is read once now,
        so a bad one stops start-up, and again on each call (a replaced Secret takes effect)."""
        if not self.token_secret_file:
            return None
        self._read_token_secret()
        return self._read_token_secret

    def _read_token_secret(self) -> bytes:
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
    def private_cache_names(self) -> tuple[str, ...]:
        return tuple(self.private_caches.split(",")) if self.private_caches else ()

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        from larder.protocol.forwarded import parse_networks

        return parse_networks(self.trusted_proxies)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)


def _parsers() -> dict[str, Callable[[Any], Any]]:
    """Each setting's parser, from its field's metadata; a field without one fails at import."""
    found = {}
    for setting in fields(Config):
        if PARSE not in setting.metadata:
            raise TypeError(f"Config.{setting.name} has no parser: declare it with _setting()")
        found[setting.name] = setting.metadata[PARSE]
    return found


_PARSERS = _parsers()


def _convert(name: str, value: object, source: str) -> Any:
    try:
        return _PARSERS[name](value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: bad value for {name}: {exc}") from None


#: Names a TOML file of defaults below the config file (the container image ships one).
DEFAULTS_ENV = "LARDER_DEFAULTS"


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's table; a :class:`ConfigError` naming ``what`` and the file when it cannot
    be read (missing included: a file named and absent is a mistake, not an empty one)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read {what} {path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}); TOML files are UTF-8"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


def _file_settings(path: Path, what: str = "config file") -> dict[str, Any]:
    values = {}
    for key, value in read_toml(path, what).items():
        if key not in _PARSERS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        values[key] = _convert(key, value, str(path))
    return values


def load_config(
    flags: Mapping[str, object | None] | None = None,
    environ: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Merge flags > env > file > defaults file > defaults into a validated :class:`Config`.

    ``flags`` holds command-line values by field name (``None`` = not given) plus an optional
    ``config`` entry naming the TOML file; ``environ`` defaults to ``os.environ``.
    ``flag_names``: the option a field's flag is spelt as, where it is not ``--field-name``
    (error messages name it).
    """
    flags = dict(flags or {})
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if env.get(DEFAULTS_ENV):
        values.update(_file_settings(Path(env[DEFAULTS_ENV]), f"defaults file ({DEFAULTS_ENV})"))
    config_file = flags.pop("config", None) or env.get("LARDER_CONFIG")
    if config_file:
        values.update(_file_settings(Path(str(config_file))))
    for setting in fields(Config):
        variable = f"LARDER_{setting.name.upper()}"
        raw = env.get(variable)
        if raw is not None and raw != "":
            values[setting.name] = _convert(setting.name, raw, variable)
    for name, value in flags.items():
        if value is not None:
            if name not in _PARSERS:
                raise ConfigError(f"unknown flag {name!r}")
            flag = (flag_names or {}).get(name) or f"--{name.replace('_', '-')}"
            values[name] = _convert(name, value, flag)
    return Config(**values)


#: Environment variables the parent of a multi-process ``larder serve`` sets in each worker
#: it starts (not settings: a worker reads its settings exactly as the parent did).
WORKER_INDEX_ENV = "LARDER_WORKER_INDEX"
WORKER_DIR_ENV = "LARDER_WORKER_DIR"
WORKER_FD_ENV = "LARDER_WORKER_FD"
WORKER_PARENT_ENV = "LARDER_WORKER_PARENT"


@dataclass(frozen=True)
class WorkerSeat:
    """What a worker process is told by its parent: its index, the shared directory, the
    descriptor of the listening socket it inherited and the parent's pid (0: not told; a worker
    that reads ``getppid()`` itself would read 1 if the parent died while it started)."""

    index: int
    directory: str
    listen_fd: int
    parent: int = 0

    def environ(self) -> dict[str, str]:
        return {
            WORKER_INDEX_ENV: str(self.index),
            WORKER_DIR_ENV: self.directory,
            WORKER_FD_ENV: str(self.listen_fd),
            WORKER_PARENT_ENV: str(self.parent),
        }


def worker_seat(environ: Mapping[str, str] | None = None) -> WorkerSeat | None:
    """The seat this process was started in by a multi-process server's parent, or ``None``."""
    env = os.environ if environ is None else environ
    if WORKER_INDEX_ENV not in env:
        return None
    try:
        index, fd = int(env[WORKER_INDEX_ENV]), int(env.get(WORKER_FD_ENV, ""))
        parent = int(env.get(WORKER_PARENT_ENV, "0"))
    except ValueError:
        raise ConfigError(f"{WORKER_INDEX_ENV} and {WORKER_FD_ENV} must be integers") from None
    directory = env.get(WORKER_DIR_ENV, "")
    if index < 0 or fd < 0 or parent < 0 or not directory:
        raise ConfigError(f"{WORKER_INDEX_ENV} is set without a valid worker seat")
    return WorkerSeat(index, directory, fd, parent)


#: ``LARDER_*`` variables that are not settings but are read by larder or set for it: the
#: config and defaults files, a server's workers, the rustc shim's own config, and those of the
#: tools, tests and benchmarks (``LARDER_TEST_*`` is left to tests).
OTHER_VARIABLES = frozenset(
    {
        "LARDER_CONFIG",
        DEFAULTS_ENV,
        WORKER_INDEX_ENV,
        WORKER_DIR_ENV,
        WORKER_FD_ENV,
        WORKER_PARENT_ENV,
        "LARDER_URL",
        "LARDER_TOKEN",
        "LARDER_DISABLE",
        "LARDER_LOG",
        "LARDER_TIMEOUT",
        "LARDER_RESIDENT",
        "LARDER_EXPLAIN_SAFE_ENV",
        "LARDER_STATE_DIR",
        "LARDER_KEY_DIR",
        "LARDER_UPLOAD_ZSTD_LEVEL",
        "LARDER_UPLOAD_NICE",
        "LARDER_SID_PREFIX",
        "LARDER_SID_ROOT",
        "LARDER_SID_APT",
        "LARDER_SID_MIRROR",
        "LARDER_DEMO_GREETING",
        "LARDER_DEMO_SQUARES",
    }
)


#: What Kubernetes sets for a Service whose name starts with ``larder`` (service links), and
#: the values it gives them: an address, a port, a protocol, or ``tcp://address:port``.
_SERVICE_LINK = re.compile(r"LARDER(_\w+)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_\w+)?)")
_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://\S+|[0-9a-fA-F.:]+|tcp|udp|sctp|TCP|UDP|SCTP")


def _service_link(variable: str, value: str) -> bool:
    """Whether ``variable=value`` is one of Kubernetes' service links (``LARDER_PORT`` is
    ``tcp://...`` there: a port number in it is a misspelt setting)."""
    if not _SERVICE_LINK.fullmatch(variable) or not _LINK_VALUE.fullmatch(value):
        return False
    return "://" in value or not variable.endswith("_PORT")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``LARDER_*`` variable that is neither a setting nor one of
    :data:`OTHER_VARIABLES` (a misspelt setting would otherwise be ignored without a word),
    naming the closest setting if one is close."""
    import difflib  # imported when used: the health check loads this module every 30 s

    env = os.environ if environ is None else environ
    settings = {f"LARDER_{name.upper()}" for name in _PARSERS}
    warnings = []
    for variable in sorted(env):
        if (
            not variable.startswith("LARDER_")
            or variable in settings
            or variable in OTHER_VARIABLES
            or variable.startswith("LARDER_TEST_")
            or _service_link(variable, env[variable])
        ):
            continue
        name = variable.removeprefix("LARDER_").lower()
        close = difflib.get_close_matches(name, list(_PARSERS), n=1)
        hint = f" (did you mean LARDER_{close[0].upper()}?)" if close else ""
        warnings.append(f"{variable} is not a larder setting and is ignored{hint}")
    return warnings
