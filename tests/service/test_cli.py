"""The ``larder`` command against a real disk store: caches, tokens, errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from larder.core.auth import TokenAuthority
from larder.errors import Unauthorized
from larder.protocol.signing import PublicKey, SecretKey
from larder.protocol.tokens import Scope
from larder.service.cli import main
from larder.storage.disk import DiskStorage


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("LARDER_CONFIG", "LARDER_STORAGE", "LARDER_PUBLIC_URL", "LARDER_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    return str(tmp_path / "data")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def verify(store: str, token: str) -> tuple[str, Scope]:
    async def check() -> tuple[str, Scope]:
        storage = DiskStorage(store)
        try:
            claims = await TokenAuthority(storage, refresh_interval=0).verify(token)
            return claims.cache, claims.scope
        finally:
            await storage.close()

    return asyncio.run(check())


def test_cache_create_show_list(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "cache", "create", "team", "--private", "--storage", store)
    assert code == 0
    created = json.loads(out)
    assert created["name"] == "team" and created["private"] is True
    assert created["substituter"] == "http://127.0.0.1:8080/team"
    assert PublicKey.parse(created["public_key"]).name.startswith("team.larder-")
    code, out, _ = run(capsys, "cache", "show", "team", "--storage", store)
    assert json.loads(out) == created
    run(capsys, "cache", "create", "other", "--priority", "10", "--storage", store)
    assert run(capsys, "cache", "list", "--storage", store)[1].split() == ["other", "team"]


def test_cache_create_refuses_duplicates_and_bad_names(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    code, out, err = run(capsys, "cache", "create", "team", "--private", "--storage", store)
    assert code == 2 and out == "" and "exists (`larder cache set team` changes its" in err
    for bad in ("Team", "../x", "api", "a" * 80):
        code, out, err = run(capsys, "cache", "create", bad, "--storage", store)
        assert code == 2 and out == "" and err.startswith("larder: "), bad
    assert run(capsys, "cache", "list", "--storage", store)[1].split() == ["team"]


def test_token_create_prints_only_the_token(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    code, out, err = run(
        capsys, "token", "create", "--cache", "team", "--scope", "write", "--storage", store
    )
    assert code == 0 and len(out.splitlines()) == 1
    token = out.strip()
    assert token not in err and "token id" in err
    assert verify(store, token) == ("team", Scope.WRITE)
    # The expiry as a UTC date a person reads (the epoch seconds beside it, for scripts).
    shown = re.search(r"expires (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \((\d+)\)$", err.strip())
    assert shown is not None, err
    when = datetime.strptime(shown[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert when.timestamp() == int(shown[2])
    assert abs(when - datetime.now(UTC) - timedelta(days=30)) < timedelta(minutes=1)
    code, _, err = run(capsys, "token", "create", "--cache", "team", "--scope", "read",
                       "--ttl", "0", "--storage", store)  # fmt: skip
    assert code == 0 and err.strip().endswith("expires never")


def test_token_create_warns_of_a_clock_off_the_stores(store: str) -> None:
    """A token made on a host two hours behind the servers is expired on arrival: the refusal
    said only "token expired". Its maker is now told at once."""
    from tests.client.test_shim import FAKETIME

    larder = [sys.executable, "-m", "larder"]
    subprocess.run([*larder, "cache", "create", "team", "--storage", store], check=True,
                   capture_output=True)  # fmt: skip
    create = [*larder, "token", "create", "--cache", "team", "--scope", "read", "--ttl", "1h",
              "--storage", store]  # fmt: skip
    on_time = subprocess.run(create, capture_output=True, text=True, check=True)
    assert "warning" not in on_time.stderr
    behind = {**os.environ, "LD_PRELOAD": str(FAKETIME), "FAKETIME": "-2h"}
    late = subprocess.run(create, capture_output=True, text=True, check=True, env=behind)
    assert "warning: this host's clock is 7200 s behind the store's" in late.stderr, late.stderr


def test_token_for_a_missing_cache_is_refused(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "cache", "create", "main", "--storage", store)[0] == 0
    code, out, err = run(
        capsys, "token", "create", "--cache", "ghost", "--scope", "read", "--storage", store
    )
    assert code == 2 and out == "" and "no cache named 'ghost'" in err


@pytest.mark.parametrize(
    "command",
    [
        ["cache", "list"],
        ["cache", "show", "main"],
        ["gc", "--dry-run"],
        ["token", "create", "--cache", "main", "--scope", "read"],
        ["token", "revoke", "abc"],
        ["pin", "--cache", "main"],
    ],
)
def test_a_command_on_a_store_that_is_not_there_creates_nothing(
    store: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, err = run(capsys, *command, "--storage", store)
    assert code == 2 and out == ""
    assert err.startswith(f"larder: disk storage: no store at {store} ")
    assert not Path(store).exists()
    assert run(capsys, *command, "--storage", f"file://{store}")[0] == 2
    assert not Path(store).exists()


def test_revoked_token_no_longer_verifies(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    _, out, err = run(
        capsys, "token", "create", "--cache", "*", "--scope", "admin", "--storage", store
    )
    token = out.strip()
    token_id = err.split("token id ")[1].split(",")[0]
    assert verify(store, token) == ("*", Scope.ADMIN)
    assert run(capsys, "token", "revoke", token_id, "--storage", store)[0] == 0
    with pytest.raises(Unauthorized, match="revoked"):
        verify(store, token)
    code, _, err = run(capsys, "token", "revoke", "../../etc", "--storage", store)
    assert code == 2 and "larder: " in err


def test_bad_ttl_and_bad_config_are_clear_errors(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    code, out, err = run(
        capsys, "token", "create", "--cache", "team", "--scope", "read", "--ttl", "soon",
        "--storage", store,
    )  # fmt: skip
    assert code == 2 and out == "" and "ttl" in err.lower()
    monkeypatch.setenv("LARDER_ZSTD_LEVEL", "max")
    code, out, err = run(capsys, "cache", "list", "--storage", store)
    assert code == 2 and "LARDER_ZSTD_LEVEL" in err


def test_a_bad_aws_setting_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio:9000")  # no scheme
    code, out, err = run(capsys, "cache", "list", "--storage", "s3://bucket")
    assert code == 2 and out == ""
    assert err.startswith("larder: cannot set up the S3 client") and err.count("\n") == 1
    assert "AWS_ENDPOINT_URL" in err


def test_small_command_line_mistakes_name_what_was_typed(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "cache", "create", "main", "--storage", store)
    code, _, err = run(capsys, "gc", "--storage", store, "--grace", "abc")
    assert code == 2 and err.startswith("larder: --grace: bad value for gc_grace")
    code, _, err = run(
        capsys, "serve", "--storage", store, "--public-url", "larder.example:8080"
    )  # fmt: skip
    assert code == 2 and "--public-url" in err and "http://" in err


def test_cache_commands_print_the_configured_substituter(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out, err = run(capsys, "cache", "create", "main", "--storage", store)
    assert json.loads(out)["substituter"] == "http://127.0.0.1:8080/main"
    assert "neither public_url nor listen is configured" in err  # a guess, and it says so
    monkeypatch.setenv("LARDER_LISTEN", "0.0.0.0:9000")
    _, out, err = run(capsys, "cache", "show", "main", "--storage", store)
    assert json.loads(out)["substituter"] == "http://127.0.0.1:9000/main" and err == ""
    monkeypatch.setenv("LARDER_PUBLIC_URL", "https://larder.example/")
    _, out, _ = run(capsys, "cache", "limits", "main", "--storage", store)
    assert json.loads(out)["substituter"] == "https://larder.example/main"


def test_rotate_key_changes_the_served_key(
    store: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, out, _ = run(capsys, "cache", "create", "team", "--storage", store)
    old = json.loads(out)["public_key"]
    code, out, err = run(capsys, "cache", "rotate-key", "team", "--storage", store)
    assert code == 0
    new = json.loads(out)["public_key"]
    assert new != old and old in err and new in err
    shown = run(capsys, "cache", "show", "team", "--storage", store)[1]
    assert json.loads(shown)["public_key"] == new

    key_file = tmp_path / "key"
    key_file.write_text(SecretKey.generate("team.imported-1").to_string() + "\n")
    code, out, _ = run(
        capsys, "cache", "rotate-key", "team", "--key-file", str(key_file), "--storage", store
    )
    assert code == 0 and json.loads(out)["public_key"].startswith("team.imported-1:")
    key_file.write_text("not a key")
    code, out, err = run(
        capsys, "cache", "rotate-key", "team", "--key-file", str(key_file), "--storage", store
    )
    assert code == 2 and out == "" and err.startswith("larder: ")
    key_file.write_text(SecretKey.generate("team.imported-2").to_string() + "\n")
    with pytest.raises(SystemExit):  # argparse: a key file names its key, so not both
        main(["cache", "rotate-key", "team", "--key-file", str(key_file), "--key-name",
              "wanted-2", "--storage", store])  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
    shown = run(capsys, "cache", "show", "team", "--storage", store)[1]
    assert json.loads(shown)["public_key"].startswith("team.imported-1:")


def test_replace_secret_ends_every_token(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    old = run(capsys, "token", "create", "--cache", "*", "--scope", "admin", "--storage", store)[1]
    assert verify(store, old.strip()) == ("*", Scope.ADMIN)
    code, out, err = run(capsys, "token", "replace-secret", "--storage", store)
    assert code == 0 and out == "" and "stop working within refresh_interval" in err
    with pytest.raises(Unauthorized, match="signature"):
        verify(store, old.strip())
    new = run(capsys, "token", "create", "--cache", "team", "--scope", "read", "--storage", store)
    assert verify(store, new[1].strip()) == ("team", Scope.READ)


def test_replace_secret_refuses_a_mounted_secret(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    before = sorted(p.name for p in Path(store).rglob("*"))
    mounted = tmp_path / "token-secret"
    mounted.write_text("ab" * 32)
    monkeypatch.setenv("LARDER_TOKEN_SECRET_FILE", str(mounted))
    code, out, err = run(capsys, "token", "replace-secret", "--storage", store)
    assert code == 2 and out == "" and "mounted (token_secret_file): replace that file" in err
    assert sorted(p.name for p in Path(store).rglob("*")) == before


def test_no_token_is_minted_for_servers_that_use_a_mounted_secret_this_command_lacks(
    store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its token would be refused by every server, and a store secret made for nothing."""
    from larder.service import cli
    from larder.service.config import Config

    mounted = tmp_path / "token-secret"
    mounted.write_text("ab" * 32)
    server = Config(storage=store, token_secret_file=str(mounted))

    async def start(config: Config) -> None:  # what `larder serve` does at start-up
        storage = DiskStorage(store)
        try:
            await cli._bootstrap(config, storage)
        finally:
            await storage.close()

    asyncio.run(start(server))
    capsys.readouterr()
    marker = json.loads((Path(store) / "objects" / "config" / "token-secret-mounted").read_text())
    assert "ab" not in json.dumps(marker) and len(marker["fingerprint"]) == 16  # not the secret
    for argv in (["create", "--cache", "main", "--scope", "write"], ["replace-secret"]):
        code, out, err = run(capsys, "token", *argv, "--storage", store)
        assert code == 2 and out == "", argv
        advice = "replace that secret where" if argv[0] == "replace-secret" else "set token_secret"
        assert f"mounted secret{': ' if argv[0] == 'create' else ' (token_secret_file): '}" in err
        assert advice in err, argv
    assert not (Path(store) / "objects" / "config" / "token-secret").exists()
    monkeypatch.setenv("LARDER_TOKEN_SECRET_FILE", str(mounted))  # with it, tokens work
    code, out, _ = run(capsys, "token", "create", "--cache", "main", "--scope", "write",
                       "--storage", store)  # fmt: skip
    assert code == 0 and not caplog.records

    async def check(token: str) -> Scope:
        storage = DiskStorage(store)
        try:
            authority = TokenAuthority(storage, 0, mounted=server.mounted_token_secret())
            return (await authority.verify(token)).scope
        finally:
            await storage.close()

    assert asyncio.run(check(out.strip())) == Scope.WRITE
    other = tmp_path / "other-secret"
    other.write_text("cd" * 32)
    monkeypatch.setenv("LARDER_TOKEN_SECRET_FILE", str(other))  # not theirs: a warning
    code, out, _ = run(capsys, "token", "create", "--cache", "main", "--scope", "write",
                       "--storage", store)  # fmt: skip
    assert code == 0 and "not the secret the servers of this store started with" in caplog.text
    monkeypatch.delenv("LARDER_TOKEN_SECRET_FILE")
    asyncio.run(start(Config(storage=store)))  # servers back on the store's secret
    assert run(capsys, "token", "create", "--cache", "main", "--scope", "write",
               "--storage", store)[0] == 0  # fmt: skip


def test_cache_set_changes_privacy_and_priority_only(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    created = json.loads(run(capsys, "cache", "create", "team", "--storage", store)[1])
    assert created["private"] is False
    code, out, _ = run(capsys, "cache", "set", "team", "--private", "--storage", store)
    assert code == 0 and json.loads(out) == {**created, "private": True}
    code, out, _ = run(capsys, "cache", "set", "team", "--priority", "0", "--storage", store)
    assert code == 0 and json.loads(out) == {**created, "private": True, "priority": 0}
    code, out, _ = run(capsys, "cache", "set", "team", "--public", "--storage", store)
    assert code == 0 and json.loads(out) == {**created, "private": False, "priority": 0}
    shown = json.loads(run(capsys, "cache", "show", "team", "--storage", store)[1])
    assert shown == {**created, "private": False, "priority": 0}
    for bad in (["--priority", "-1"], ["--priority", str(2**31)]):
        code, out, err = run(capsys, "cache", "set", "team", *bad, "--storage", store)
        assert code == 2 and out == "" and "--priority must be between" in err
    code, out, err = run(capsys, "cache", "set", "nope", "--private", "--storage", store)
    assert code == 2 and out == "" and "no cache named 'nope'" in err
    with pytest.raises(SystemExit):  # argparse: not both
        main(["cache", "set", "team", "--private", "--public", "--storage", store])
    assert json.loads(run(capsys, "cache", "show", "team", "--storage", store)[1]) == shown


async def test_private_caches_are_created_or_made_private_at_start(tmp_path: Path) -> None:
    """A cache created by signing_keys_dir (or before) could not be made private any other way."""
    from larder.core.caches import CacheRegistry
    from larder.service import cli
    from larder.service.config import Config
    from larder.storage.memory import MemoryStorage

    storage = MemoryStorage()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "main.key").write_text(SecretKey.generate("main.example-1").to_string() + "\n")
    (keys / "open.key").write_text(SecretKey.generate("open.example-1").to_string() + "\n")
    await CacheRegistry(storage).create("older")
    registry = CacheRegistry(storage, refresh_interval=0)

    async def privacy() -> dict[str, bool]:
        found = {name: await registry.get(name) for name in await registry.names()}
        return {name: settings.private for name, settings in found.items() if settings}

    await cli._bootstrap(
        Config(signing_keys_dir=str(keys), private_caches="main,older,team"), storage
    )
    assert await privacy() == {"main": True, "older": True, "team": True, "open": False}
    older = await registry.get("older")
    assert older is not None
    await registry.update(replace(older, private=False))
    await cli._bootstrap(Config(signing_keys_dir=str(keys)), storage)  # left out: unchanged
    assert await privacy() == {"main": True, "older": False, "team": True, "open": False}


def test_cache_trust_sets_and_clears_upload_keys(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "cache", "create", "team", "--storage", store)
    key = SecretKey.generate("ci.example-1").public_key().to_string()
    code, out, _ = run(capsys, "cache", "trust", "team", "--key", key, "--storage", store)
    assert code == 0 and json.loads(out)["trusted_upload_keys"] == [key]
    code, out, err = run(capsys, "cache", "trust", "team", "--key", "nonsense", "--storage", store)
    assert code == 2 and out == "" and err.startswith("larder: ")
    shown = json.loads(run(capsys, "cache", "show", "team", "--storage", store)[1])
    assert shown["trusted_upload_keys"] == [key]
    code, out, _ = run(capsys, "cache", "trust", "team", "--storage", store)
    assert code == 0 and json.loads(out)["trusted_upload_keys"] == []


def test_serve_takes_a_workers_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from larder.service.cli import _config, build_parser

    monkeypatch.delenv("LARDER_WORKERS", raising=False)
    args = build_parser().parse_args(["serve", "--workers", "2", "--storage", "memory://"])
    assert _config(args).workers == 2
    assert _config(build_parser().parse_args(["serve"])).workers == 1


async def test_start_up_work_waits_for_unreachable_storage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server starts with its storage down (``/readyz`` says so); cache ``main`` is created
    once the storage answers, not never."""
    from larder.core.caches import CacheRegistry
    from larder.errors import StorageUnavailable
    from larder.service import cli, server
    from larder.service.config import Config
    from larder.storage.memory import MemoryStorage

    class Down(MemoryStorage):
        down = True

        async def get(self, key: str) -> bytes | None:
            if self.down:
                raise StorageUnavailable("connection refused")
            return await super().get(key)

        async def keys(self, prefix: str):  # type: ignore[no-untyped-def]
            if self.down:
                raise StorageUnavailable("connection refused")
            async for key in super().keys(prefix):
                yield key

    monkeypatch.setattr(server, "BOOTSTRAP_RETRY", (0.05, 0.1))
    storage, config = Down(), Config()
    assert not await server.bootstrap_or_defer(config, storage, cli._bootstrap)
    assert "storage unreachable at start-up (connection refused)" in caplog.text
    assert [key async for key in MemoryStorage.keys(storage, "")] == []
    retry = asyncio.create_task(server.bootstrap_until_done(config, storage, cli._bootstrap))
    await asyncio.sleep(0.3)
    assert not retry.done() and "storage still unreachable" in caplog.text
    storage.down = False
    await asyncio.wait_for(retry, 5)
    assert await CacheRegistry(storage, 1.0).names() == ["main"]


async def test_a_store_that_gives_other_bytes_back_stops_the_start() -> None:
    """The start-up work first checks that the store keeps the bytes written (an S3-compatible
    store keeping aws-chunked framing would corrupt every object): else the server stops with
    the store's one line, before writing anything."""
    from larder.core.caches import CacheRegistry
    from larder.errors import StorageError
    from larder.service import cli, server
    from larder.service.config import Config
    from larder.storage.memory import MemoryStorage

    class Mangling(MemoryStorage):
        checked = 0

        async def check_writes(self) -> None:
            self.checked += 1
            raise StorageError("the store returned other bytes than were written: ...")

    storage = Mangling()
    with pytest.raises(StorageError, match="returned other bytes"):
        await server.bootstrap_or_defer(Config(), storage, cli._bootstrap)
    assert storage.checked == 1
    assert await CacheRegistry(storage, 1.0).names() == []


async def test_a_signing_keys_dir_that_is_not_there_stops_the_start(tmp_path: Path) -> None:
    """A Secret mounted at another path went unnoticed: the cache got a generated key."""
    from larder.errors import LarderError
    from larder.service import cli
    from larder.service.config import Config
    from larder.storage.memory import MemoryStorage

    missing = Config(signing_keys_dir=str(tmp_path / "not-mounted"))
    with pytest.raises(LarderError, match="not-mounted is not a directory"):
        await cli._bootstrap(missing, MemoryStorage())
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "main.key").write_text("main.larder-1:not a key\n")
    with pytest.raises(LarderError, match=r"main\.key: not a Nix secret key"):
        await cli._bootstrap(Config(signing_keys_dir=str(keys)), MemoryStorage())


def test_a_port_that_cannot_be_listened_on_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        code, _, err = run(
            capsys, "serve", "--listen", f"127.0.0.1:{port}", "--storage", str(tmp_path / "d")
        )
    finally:
        taken.close()
    assert code == 2
    assert err.strip() == f"larder: cannot listen on 127.0.0.1:{port}: Address already in use"


def _serve_on_port_0(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    """``larder serve --listen 127.0.0.1:0`` with a disk store in ``tmp_path`` and ``env``;
    stdout and stderr piped."""
    environ = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("LARDER_CONFIG", "LARDER_PUBLIC_URL", "LARDER_LISTEN", "LARDER_WORKERS"):
        environ.pop(name, None)
    command = [sys.executable, "-m", "larder", "serve", "--listen", "127.0.0.1:0"]
    return subprocess.Popen(
        [*command, "--storage", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**environ, **env},
        text=True,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_0_prints_the_port_the_server_got(tmp_path: Path, workers: str) -> None:
    proc = _serve_on_port_0(tmp_path, LARDER_WORKERS=workers)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        served = re.fullmatch(r"larder serving on http://127\.0\.0\.1:(\d+)\n", lines[1])
        assert served is not None and served[1] != "0", lines
        assert lines[2] == f"cache main: substituter http://127.0.0.1:{served[1]}/main\n"
        url = f"http://127.0.0.1:{served[1]}/main/nix-cache-info"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b"StoreDir: /nix/store" in answer.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_the_json_access_log_is_json_lines_with_a_time(tmp_path: Path) -> None:
    proc = _serve_on_port_0(tmp_path, LARDER_ACCESS_LOG="json")
    try:
        assert proc.stdout is not None
        served = re.search(r":(\d+)\n", [proc.stdout.readline() for _ in range(2)][1])
        assert served is not None
        base = f"http://127.0.0.1:{served[1]}"
        for path in ("/main/nix-cache-info", "/api/v1/caches/main"):  # short path, aiohttp
            with urllib.request.urlopen(base + path, timeout=10) as answer:
                answer.read()
        before = time.time()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if "/main/nix-cache-info" in line or "/api/" in line]
    assert len(lines) == 2, err
    for line in lines:
        entry = json.loads(line)  # the whole line: no logging prefix
        logged = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
        assert logged.utcoffset() == timedelta(0)
        assert before - 60 < logged.timestamp() <= before + 1


@pytest.fixture
def healthz() -> Iterator[int]:
    """A server answering ``GET /healthz`` on a port of its own."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_probes_the_configured_listen_address(
    healthz: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LARDER_CONFIG", raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # the probe never goes via a proxy
    monkeypatch.setenv("LARDER_LISTEN", f"0.0.0.0:{healthz}")  # as the image sets it
    assert run(capsys, "healthcheck") == (0, "", "")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("LARDER_LISTEN", f"127.0.0.1:{port}")  # nothing listens there
    code, out, err = run(capsys, "healthcheck")
    assert code == 1 and out == "" and f"127.0.0.1:{port}/healthz" in err


def test_the_image_health_check_reads_listen_as_the_server_does_and_loads_nothing_heavy(
    healthz: int, tmp_path: Path
) -> None:
    """It runs every 30 s under the container's CPU limit: no aiohttp, storage or tokens."""
    from larder.service.healthcheck import listen_address

    config = tmp_path / "larder.toml"
    config.write_text(f'listen = "[::]:{healthz}"\n')
    assert listen_address({}) == "127.0.0.1:8080"  # the default
    assert listen_address({"LARDER_CONFIG": str(config)}) == f"[::]:{healthz}"
    assert listen_address({"LARDER_CONFIG": str(config), "LARDER_LISTEN": "0.0.0.0:1"}) == (
        "0.0.0.0:1"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARDER_")}
    probe = [sys.executable, "-m", "larder.service.healthcheck"]
    for extra, code in (({"LARDER_LISTEN": f"0.0.0.0:{healthz}"}, 0), ({}, 1)):
        done = subprocess.run(probe, env={**env, **extra}, capture_output=True, timeout=30)
        assert done.returncode == code, done.stderr
    done = subprocess.run([*probe, "--config", str(config)], env=env, timeout=30)
    assert done.returncode == 0  # [::] is probed on 127.0.0.1, where the test server is
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, larder.service.healthcheck as h; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & "
         "{'aiohttp', 'boto3', 'botocore', 'zstandard', 'jwt', 'cryptography'}))"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert loaded.stdout.strip() == "[]"


def test_a_misspelt_setting_in_the_environment_is_warned_about(
    store: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LARDER_GC_MAXSIZE", "400GiB")  # LARDER_GC_MAX_SIZE
    monkeypatch.setenv("LARDER_URL", "http://larder:8080/main")  # the rustc shim's
    assert run(capsys, "cache", "create", "main", "--storage", store)[0] == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "LARDER_GC_MAXSIZE is not a larder setting and is ignored "
        "(did you mean LARDER_GC_MAX_SIZE?)"
    ]


def test_a_config_file_that_is_not_utf8_stops_commands_and_the_probe_with_one_line(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "larder.toml"
    config.write_bytes(b'# caf\xe9 config\nlisten = "127.0.0.1:1"\n')
    code, out, err = run(capsys, "cache", "list", "--config", str(config), "--storage", store)
    assert (code, out) == (2, "") and err.startswith(f"larder: cannot read config file {config}")
    assert len(err.splitlines()) == 1 and "not UTF-8" in err
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARDER_")}
    probe = [sys.executable, "-m", "larder.service.healthcheck", "--config", str(config)]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stderr.splitlines() == [err.strip()]  # 2: Docker's


def test_the_printed_write_token_command_runs_as_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `make run` larder is .venv/bin/larder, not on PATH: `larder token ...` would fail."""
    from larder.service import cli
    from larder.service.config import Config
    from larder.storage.memory import MemoryStorage

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "larder"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)

    def printed(argv0: str, path: str) -> str:
        monkeypatch.setattr(sys, "argv", [argv0, "serve"])
        monkeypatch.setenv("PATH", path)
        asyncio.run(cli._bootstrap(Config(storage="./larder-data"), MemoryStorage()))
        out = capsys.readouterr().out
        return next(line for line in out.splitlines() if "write token:" in line).split(": ", 1)[1]

    monkeypatch.chdir(tmp_path)
    assert printed("bin/larder", "/usr/bin:/bin").startswith("bin/larder token create ")
    assert printed(str(script), f"{bin_dir}:/usr/bin").startswith("larder token create ")
    assert printed("/src/larder/__main__.py", "/usr/bin").startswith(
        f"{sys.executable} -m larder token create --storage ./larder-data --cache main"
    )


def test_the_printed_write_token_command_is_quoted_and_names_a_mounted_secret() -> None:
    """A store path with a space, or servers signing with a mounted secret (the command then
    refuses without it): the printed line must still run as printed."""
    from larder.service import cli
    from larder.service.config import Config

    line = cli._token_command(Config(storage="/srv/build cache", token_secret_file="/run/s k"))
    words = shlex.split(line)
    assert words[0] == "LARDER_TOKEN_SECRET_FILE=/run/s k"
    assert words[-2:] == ["--storage", "/srv/build cache"]


def test_larder_healthcheck_fails_with_1_on_a_config_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Docker reserves exit status 2 for health checks."""
    code, _, err = run(capsys, "healthcheck", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "cannot read config file" in err


def test_serve_says_why_it_stops_when_its_output_is_closed(tmp_path: Path) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    listen = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    command = [sys.executable, "-m", "larder", "serve", "--storage", str(tmp_path / "s"),
               "--listen", listen]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARDER_")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `larder serve | true`
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        proc.stderr.close()
    assert "standard output was closed" in err


def test_larder_healthcheck_fails_with_1_on_a_bad_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "healthcheck", "--no-such-option")
    assert code == 1 and "unrecognized arguments" in err


def test_help_names_every_command_and_reads_as_text() -> None:
    """``larder --help`` once listed commands that had changed and said every one took
    ``--storage`` (healthcheck does not), in the docstring's markup."""
    from larder.service.cli import build_parser

    def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(found[0].choices) if found else {}

    def options(parser: argparse.ArgumentParser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings}

    parser = build_parser()
    text = parser.format_help()
    assert "``" not in text and ":mod:" not in text
    checked = 0
    for name, command in commands(parser).items():
        assert name in text
        for child, leaf in commands(command).items() or {"": command}.items():
            assert child in command.format_help(), (name, child)  # token replace-secret, ...
            assert "--config" in options(leaf), (name, child)
            assert ("--storage" in options(leaf)) == (name != "healthcheck"), (name, child)
            checked += 1
    assert checked >= 15
