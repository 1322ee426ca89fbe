"""Config precedence (flags > LARDER_* env > TOML file > defaults) and validation."""

from __future__ import annotations

import json
import os
import re
from dataclasses import Field, fields
from pathlib import Path

import pytest

from larder.service.config import (
    PARSE,
    Config,
    ConfigError,
    WorkerSeat,
    load_config,
    parse_listen,
    parse_size,
    unknown_variables,
    worker_seat,
)
from larder.service.server import worker_count


def test_defaults_are_the_embedded_default() -> None:
    config = load_config({}, environ={})
    assert config == Config()
    assert config.host_port == ("127.0.0.1", 8080)
    assert config.storage == "./larder-data"


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "larder.toml"
    path.write_text(
        'listen = "0.0.0.0:9000"\nstorage = "/srv/file"\nmax_upload_size = "1GiB"\nzstd_level = 5\n'
    )
    env = {"LARDER_CONFIG": str(path), "LARDER_STORAGE": "s3://env-bucket/x"}
    config = load_config({"listen": "127.0.0.1:7000", "storage": None}, environ=env)
    assert config.listen == "127.0.0.1:7000"  # flag
    assert config.storage == "s3://env-bucket/x"  # env over file
    assert config.max_upload_size == 1024**3  # file
    assert config.zstd_level == 5
    assert config.refresh_interval == Config().refresh_interval  # default


def test_the_defaults_file_is_below_the_config_file(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults.toml"
    defaults.write_text('listen = "0.0.0.0:8080"\nstorage = "/var/lib/larder"\nzstd_level = 7\n')
    path = tmp_path / "larder.toml"
    path.write_text('listen = "0.0.0.0:9000"\n')
    env = {"LARDER_DEFAULTS": str(defaults), "LARDER_CONFIG": str(path)}
    config = load_config({}, environ=env)
    assert (config.listen, config.storage, config.zstd_level) == (
        "0.0.0.0:9000",
        "/var/lib/larder",
        7,
    )
    env["LARDER_ZSTD_LEVEL"] = "9"
    assert load_config({}, environ=env).zstd_level == 9
    missing = {"LARDER_DEFAULTS": str(tmp_path / "none.toml")}  # named and absent: a mistake
    with pytest.raises(ConfigError, match=r"defaults file \(LARDER_DEFAULTS\) .*none.toml"):
        load_config({}, environ=missing)
    defaults.write_text('lisen = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError, match="unknown setting 'lisen'"):
        load_config({}, environ=env)


def test_config_flag_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('public_url = "https://larder.example/"\n')
    config = load_config({"config": str(path)}, environ={"LARDER_CONFIG": "/does/not/exist"})
    assert config.public_url == "https://larder.example"


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1048576), ("64MiB", 64 * 1024**2), ("8GB", 8 * 1000**3), ("512k", 512_000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5G", "12 parsecs"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_listen() -> None:
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":8080") == ("0.0.0.0", 8080)
    for bad in ("8080", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_listen(bad)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LARDER_LISTEN": "nowhere"}, "LARDER_LISTEN"),
        ({"LARDER_MAX_UPLOAD_SIZE": "lots"}, "LARDER_MAX_UPLOAD_SIZE"),
        ({"LARDER_LOG_LEVEL": "chatty"}, "log_level"),
        ({"LARDER_ZSTD_LEVEL": "high"}, "zstd_level"),
        ({"LARDER_CONFIG": "/does/not/exist.toml"}, "cannot read config file"),
        ({"LARDER_HEADER_TIMEOUT": "-1"}, "LARDER_HEADER_TIMEOUT: bad value .* negative"),
        ({"LARDER_MAX_CONNECTIONS": "many"}, "LARDER_MAX_CONNECTIONS"),
        ({"LARDER_MAX_CONNECTIONS": "-5"}, "not within 0-"),
        ({"LARDER_STORAGE": "ftp://x"}, "LARDER_STORAGE: bad value for storage: unknown storage"),
        ({"LARDER_STORAGE": "s3://ab"}, "invalid S3 bucket name"),
        ({"LARDER_STORAGE": "memory://x"}, "memory storage takes no path"),
        # Served as the substituter: Nix cannot use one without its scheme or host.
        ({"LARDER_PUBLIC_URL": "larder.example:8080"}, "LARDER_PUBLIC_URL: .* http:// or https"),
        ({"LARDER_PUBLIC_URL": "ftp://larder.example"}, "http:// or https://"),
        ({"LARDER_PUBLIC_URL": "https://"}, "with a host"),
        ({"LARDER_PUBLIC_URL": "http://larder:99999"}, "not a URL"),
        ({"LARDER_PUBLIC_URL": "https://larder.example/?x=1"}, "query"),
    ],
)
def test_bad_values_name_their_source(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({}, environ=env)


def test_public_urls_clients_can_use_are_taken() -> None:
    for url in ("https://larder.example/", "http://[::1]:8080/larder", "http://10.0.0.1:80"):
        assert load_config({"public_url": url}, environ={}).public_url == url.rstrip("/")
    assert load_config({}, environ={"LARDER_PUBLIC_URL": ""}).public_url == ""


def test_a_flag_spelt_otherwise_is_named_as_spelt() -> None:
    with pytest.raises(ConfigError, match=r"^--grace: bad value for gc_grace"):
        load_config({"gc_grace": "abc"}, environ={}, flag_names={"gc_grace": "--grace"})


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        # A negative cap from the file was taken: gc evicted the whole store every hour.
        ("gc_max_size = -100", "gc_max_size"),
        ("max_upload_size = -5", "max_upload_size"),
        ("max_upload_size = 0", "max_upload_size"),
        ("max_document_size = 1.5", "max_document_size"),
        ("max_nar_size = true", "max_nar_size"),
        ("body_idle_timeout = 0", "body_idle_timeout"),
        ("body_idle_timeout = -1", "body_idle_timeout"),
        ("storage_timeout = 0.5", "storage_timeout"),
        ("gc_grace = nan", "gc_grace"),
        ("worker_timeout = inf", "worker_timeout"),
        ("refresh_interval = -1", "refresh_interval"),
        ("usage_interval = nan", "usage_interval"),
        ("header_timeout = inf", "header_timeout"),
        ("default_priority = -1", "default_priority"),
        ("zstd_level = 99", "zstd_level"),
        ("workers = true", "workers"),
        ("workers = 100000", "workers"),
        ("max_connections = 1.9", "max_connections"),
        ('storage = ["a", "b"]', "storage"),
        ("signing_keys_dir = 5", "signing_keys_dir"),
        ('private_caches = ["main", "Team"]', "private_caches"),
        ('private_caches = "main,../x"', "private_caches"),
        ("private_caches = [5]", "private_caches"),
        ('trusted_proxies = ["10.0.0.0/8", "proxy.local"]', "trusted_proxies"),
        ("trusted_proxies = [5]", "trusted_proxies"),
    ],
)
def test_values_that_would_leave_a_broken_server_are_refused(
    tmp_path: Path, line: str, setting: str
) -> None:
    path = tmp_path / "larder.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"bad value for {setting}"):
        load_config({"config": str(path)}, environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LARDER_GC_MAX_SIZE", "-100"),
        ("LARDER_WORKER_TIMEOUT", "nan"),
        ("LARDER_GC_GRACE", "inf"),
        ("LARDER_REFRESH_INTERVAL", "nan"),
        ("LARDER_ZSTD_LEVEL", "0"),
        ("LARDER_MAX_CONNECTIONS", "1.9"),
    ],
)
def test_the_same_values_from_the_environment_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({}, environ={name: value})


def test_connection_guards_from_env_and_file(tmp_path: Path) -> None:
    assert (Config().header_timeout, Config().max_connections) == (30.0, 1000)
    path = tmp_path / "larder.toml"
    path.write_text("header_timeout = 5\nmax_connections = 64\n")
    config = load_config({"config": str(path)}, environ={"LARDER_HEADER_TIMEOUT": "2.5"})
    assert (config.header_timeout, config.max_connections) == (2.5, 64)


def test_unknown_or_malformed_file_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "larder.toml"
    path.write_text('lisen = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="unknown setting 'lisen'"):
        load_config({"config": str(path)}, environ={})
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config({"config": str(path)}, environ={})


def test_a_config_file_that_is_not_utf8_is_named_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "larder.toml"
    path.write_bytes(b'# caf\xe9 config\nlisten = "127.0.0.1:1"\n')  # Latin-1
    with pytest.raises(ConfigError) as raised:
        load_config({"config": str(path)}, environ={})
    assert raised.value.message == (
        f"cannot read config file {path}: not UTF-8 (byte 0xe9 at offset 5); TOML files are UTF-8"
    )


def test_token_secret_file(tmp_path: Path) -> None:
    def mounted(config: Config) -> bytes:
        read = config.mounted_token_secret()
        assert read is not None
        return read()

    hex_file = tmp_path / "hex"
    hex_file.write_text("ab" * 32 + "\n")
    config = load_config({"token_secret_file": str(hex_file)}, environ={})
    assert mounted(config) == bytes.fromhex("ab" * 32)
    raw = tmp_path / "raw"
    raw.write_bytes(b"x" * 40)
    assert mounted(load_config({}, environ={"LARDER_TOKEN_SECRET_FILE": str(raw)})) == b"x" * 40
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        load_config({"token_secret_file": str(short)}, environ={}).mounted_token_secret()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(
            {"token_secret_file": str(tmp_path / "absent")}, environ={}
        ).mounted_token_secret()
    assert Config().mounted_token_secret() is None


def test_mounted_token_secret_is_read_again(tmp_path: Path) -> None:
    """A replaced file (a Kubernetes Secret updated in place) is what the next call returns."""
    path = tmp_path / "secret"
    path.write_text("ab" * 32)
    read = load_config({"token_secret_file": str(path)}, environ={}).mounted_token_secret()
    assert read is not None and read() == bytes.fromhex("ab" * 32)
    path.write_text("cd" * 32)
    assert read() == bytes.fromhex("cd" * 32)


def test_workers_and_event_loop_from_env_file_and_flag(tmp_path: Path) -> None:
    assert (Config().workers, Config().event_loop) == (1, "uvloop")
    path = tmp_path / "larder.toml"
    path.write_text('workers = 3\nevent_loop = "ASYNCIO"\n')
    config = load_config({}, environ={"LARDER_CONFIG": str(path)})
    assert (config.workers, config.event_loop) == (3, "asyncio")
    config = load_config({"workers": "0"}, environ={"LARDER_WORKERS": "2"})
    assert config.workers == 0  # the flag wins; 0 means one per CPU
    assert worker_count(config, tmp_path / "no-cpu.max") == len(os.sched_getaffinity(0))
    assert worker_count(load_config({}, environ={"LARDER_WORKERS": "2"})) == 2
    with pytest.raises(ConfigError, match="LARDER_WORKERS: bad value for workers"):
        load_config({}, environ={"LARDER_WORKERS": "-1"})
    with pytest.raises(ConfigError, match="LARDER_EVENT_LOOP: bad value for event_loop"):
        load_config({}, environ={"LARDER_EVENT_LOOP": "tokio"})
    assert Config().worker_timeout == 30.0
    with pytest.raises(ConfigError, match="LARDER_WORKER_TIMEOUT: bad value for worker_timeout"):
        load_config({}, environ={"LARDER_WORKER_TIMEOUT": "0.5"})


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", None),  # no quota: every CPU the process may run on
        ("200000 100000", 2),  # a pod's 2-CPU limit
        ("150000 100000", 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 1),  # half a CPU: still one worker
        ("10000000 100000", None),  # 100 CPUs allowed: no more than it may run on
        ("garbage", None),
    ],
)
def test_workers_0_honours_a_cgroup_cpu_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    cpus = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    config = Config(workers=0)
    assert worker_count(config, path) == (cpus if expected is None else min(cpus, expected))
    assert worker_count(Config(workers=3), path) == 3  # a number given is taken as it is


def test_a_worker_seat_comes_from_the_environment_its_parent_set() -> None:
    assert worker_seat({}) is None
    assert worker_seat({"LARDER_WORKERS": "2"}) is None  # a setting, not a seat
    seat = WorkerSeat(1, "/tmp/shared", 3)
    assert worker_seat(seat.environ()) == seat
    for bad in (
        {"LARDER_WORKER_INDEX": "1"},
        {"LARDER_WORKER_INDEX": "x", "LARDER_WORKER_FD": "3", "LARDER_WORKER_DIR": "/d"},
        {"LARDER_WORKER_INDEX": "-1", "LARDER_WORKER_FD": "3", "LARDER_WORKER_DIR": "/d"},
        {"LARDER_WORKER_INDEX": "0", "LARDER_WORKER_FD": "3", "LARDER_WORKER_DIR": ""},
    ):
        with pytest.raises(ConfigError, match="LARDER_WORKER_INDEX"):
            worker_seat(bad)


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("setting", fields(Config), ids=lambda setting: setting.name)
def test_every_setting_parses_its_default_from_env_and_file(
    setting: Field[object], tmp_path: Path
) -> None:
    default = getattr(Config(), setting.name)
    assert callable(setting.metadata.get(PARSE)), f"{setting.name} has no parser"
    variable = f"LARDER_{setting.name.upper()}"
    assert getattr(load_config({}, environ={variable: str(default)}), setting.name) == default
    path = tmp_path / "larder.toml"
    path.write_text(f"{setting.name} = {_toml(default)}\n")
    assert getattr(load_config({"config": str(path)}, environ={}), setting.name) == default


# A value other than the default for every setting: (as text, as in a TOML file, parsed).
SAMPLES: dict[str, tuple[str, object, object]] = {
    "listen": ("[::1]:9000", "[::1]:9000", "[::1]:9000"),
    "storage": ("s3://bucket/prefix", "/srv/larder", None),
    "public_url": ("https://larder.example/", "https://larder.example", "https://larder.example"),
    "max_upload_size": ("8GiB", 1000, None),
    "max_document_size": ("2MiB", "2MiB", 2 * 1024**2),
    "max_nar_size": ("1TB", 1024, None),
    "zstd_level": ("9", 9, 9),
    "storage_timeout": ("1m", 5, None),
    "refresh_interval": ("2.5", 2.5, 2.5),
    "default_priority": ("40", 40, 40),
    "log_level": ("DEBUG", "warning", None),
    "access_log": ("json", "JSON", "json"),
    "usage_interval": ("0", 0, 0.0),
    "token_secret_file": ("/run/secret", "/run/secret", "/run/secret"),
    "body_idle_timeout": ("5", 5.5, None),
    "signing_keys_dir": ("/keys", "/keys", "/keys"),
    "private_caches": (" main, team,main ", ["team", "main"], None),
    "trusted_proxies": (" 10.0.0.0/8, ::1 ", ["10.1.0.0/16"], None),
    "gc_interval": ("12h", "15m", None),
    "gc_max_size": ("10GiB", "10GiB", 10 * 1024**3),
    "gc_retention": ("30d", 86400, None),
    "gc_grace": ("90s", "90s", 90.0),
    "use_flush_interval": ("0.5", 2, None),
    "header_timeout": ("0", 1.5, None),
    "max_connections": ("64", 64, 64),
    "workers": ("0", 4, None),
    "worker_timeout": ("2m", 5, 120.0),
    "event_loop": ("asyncio", "AsyncIO", "asyncio"),
}
EXPECTED_FROM_TEXT: dict[str, object] = {
    "trusted_proxies": "10.0.0.0/8,::1/128",
    "storage_timeout": 60.0,
    "private_caches": "main,team",
    "storage": "s3://bucket/prefix",
    "max_upload_size": 8 * 1024**3,
    "max_nar_size": 1000**4,
    "log_level": "debug",
    "body_idle_timeout": 5.0,
    "gc_interval": 12 * 3600.0,
    "gc_retention": 30 * 86400.0,
    "use_flush_interval": 0.5,
    "header_timeout": 0.0,
    "workers": 0,
}
EXPECTED_FROM_FILE: dict[str, object] = {
    "trusted_proxies": "10.1.0.0/16",
    "storage_timeout": 5.0,
    "private_caches": "team,main",
    "storage": "/srv/larder",
    "max_upload_size": 1000,
    "max_nar_size": 1024,
    "log_level": "warning",
    "body_idle_timeout": 5.5,
    "gc_interval": 900.0,
    "gc_retention": 86400.0,
    "use_flush_interval": 2.0,
    "header_timeout": 1.5,
    "workers": 4,
    "worker_timeout": 5.0,
}


def test_every_setting_has_a_sample() -> None:
    assert set(SAMPLES) == {setting.name for setting in fields(Config)}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_setting_parses_from_env_flag_and_file(name: str, tmp_path: Path) -> None:
    text, in_file, parsed = SAMPLES[name]
    from_text = EXPECTED_FROM_TEXT.get(name, parsed)
    from_file = EXPECTED_FROM_FILE.get(name, parsed)
    assert getattr(Config(), name) not in (from_text, from_file)  # the value really changes
    variable = f"LARDER_{name.upper()}"
    assert getattr(load_config({}, environ={variable: text}), name) == from_text
    assert getattr(load_config({name: text}, environ={}), name) == from_text
    path = tmp_path / "larder.toml"
    path.write_text(f"{name} = {_toml(in_file)}\n")
    assert getattr(load_config({"config": str(path)}, environ={}), name) == from_file


def test_a_misspelt_variable_is_named_with_the_setting_it_is_close_to() -> None:
    env = {
        "LARDER_GC_MAXSIZE": "400GiB",
        "LARDER_BANANA": "1",
        "LARDER_GC_MAX_SIZE": "1GiB",
        "LARDER_URL": "http://larder:8080/main",
        "LARDER_WORKER_INDEX": "0",
        "LARDER_TEST_FOO": "1",
        # Kubernetes' service links for a Service named larder (or larder-cache)
        "LARDER_SERVICE_HOST": "10.0.0.7",
        "LARDER_SERVICE_PORT_HTTP": "8080",
        "LARDER_PORT": "tcp://10.0.0.7:8080",
        "LARDER_PORT_8080_TCP_ADDR": "10.0.0.7",
        "LARDER_CACHE_SERVICE_HOST": "10.0.0.8",
        "LARDER_PORT_8080_TCP_PROTO": "tcp",
        # ... but a port given where a setting was meant is still named
        "LARDER_LISTEN_PORT": "9000",
        "PATH": "/bin",
    }
    warned = unknown_variables(env)
    assert warned[:2] == [
        "LARDER_BANANA is not a larder setting and is ignored",
        "LARDER_GC_MAXSIZE is not a larder setting and is ignored "
        "(did you mean LARDER_GC_MAX_SIZE?)",
    ]
    assert len(warned) == 3 and warned[2].startswith("LARDER_LISTEN_PORT is not")


def test_every_larder_variable_the_project_names_is_known() -> None:
    """Settings, or one of the variables read or set outside the config (shim, workers,
    tools, tests): a variable used anywhere must not be reported as a typo."""
    root = Path(__file__).resolve().parents[2]
    named: set[str] = set()
    for path in root.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if hidden or not path.is_file() or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        named.update(re.findall(r"\bLARDER_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert "LARDER_URL" in named and "LARDER_GC_MAX_SIZE" in named
    named.remove("LARDER_GC_MAXSIZE")  # the typo the README and these tests show
    # (with the value Kubernetes gives LARDER_PORT: the docs name its service links)
    assert unknown_variables(dict.fromkeys(named, "tcp://10.0.0.7:8080")) == []


def test_the_settings_reference_has_every_setting_with_its_variable_and_default() -> None:
    """docs/settings.md is the one list of settings: a setting added without a row, a row left
    after a setting went, or a default changed on one side only fails here."""
    from larder.service.config import _PARSERS

    table = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    rows = {}
    for line in table.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == {setting.name for setting in fields(Config)}
    for setting in fields(Config):
        _, variable, default, meaning = rows[setting.name]
        assert variable == f"`LARDER_{setting.name.upper()}`"
        written = default.strip("`")
        parsed = _PARSERS[setting.name]("" if written == '""' else written)
        assert parsed == setting.default, (setting.name, written)
        assert meaning.endswith("."), setting.name
