"""The ``larder`` command (:data:`DESCRIPTION`): ``serve``, ``healthcheck``,
``token create|revoke|replace-secret``, ``cache create|show|list|set|rotate-key|trust|limits``,
``gc``, ``verify``, ``pin`` and ``unpin``.

Every subcommand but ``healthcheck`` (``--config`` only) takes ``--storage`` and ``--config``
(also ``LARDER_STORAGE`` / ``LARDER_CONFIG``), so an operator can mint a token for a running
deployment by pointing at the same directory or bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from larder.core.auth import TokenAuthority, check_secret_source, record_secret_source
from larder.core.caches import DEFAULT_CACHE, CacheRegistry, CacheSettings
from larder.core.gc.collector import Collector
from larder.core.gc.lock import store_now
from larder.core.pins import pin, pins, unpin
from larder.core.verify import verify
from larder.errors import LarderError, StorageUnavailable
from larder.protocol.names import check_cache_name
from larder.protocol.signing import PublicKey, SecretKey
from larder.protocol.tokens import Scope, parse_ttl
from larder.service import healthcheck
from larder.service.config import (
    Config,
    load_config,
    parse_size,
    unknown_variables,
    worker_seat,
)
from larder.service.housekeeping import gc_policies, store_policy
from larder.service.server import LOG_FORMAT, serve
from larder.storage.base import Storage
from larder.storage.factory import open_storage

log = logging.getLogger("larder")
#: Seconds this host's clock may differ from the store's before `token create` warns.
CLOCK_WARNING = 60.0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="directory or s3://BUCKET[/PREFIX] (LARDER_STORAGE)")
    parser.add_argument("--config", help="TOML config file (LARDER_CONFIG)")


#: What ``larder --help`` says before the commands.
DESCRIPTION = (
    "A remote build cache for Nix (binary-cache protocol), larder-rustc and sccache (WebDAV). "
    "Every command but healthcheck takes --storage (LARDER_STORAGE) and --config "
    "(LARDER_CONFIG): point it at a running deployment's directory or bucket to manage it."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="larder", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    _common(serve)
    serve.add_argument("--listen", help="HOST:PORT (LARDER_LISTEN, default 127.0.0.1:8080)")
    serve.add_argument("--public-url", help="base URL clients use (LARDER_PUBLIC_URL)")
    serve.add_argument("--workers", help="server processes, 0: one per CPU (LARDER_WORKERS)")

    health = commands.add_parser(
        "healthcheck", help="exit 0 if the server on the configured listen address is up"
    )
    health.add_argument("--config", help="TOML config file (LARDER_CONFIG)")

    token = commands.add_parser(
        "token", help="create or revoke access tokens, or replace the secret signing them"
    )
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="print a new token on stdout")
    _common(create)
    create.add_argument("--cache", required=True, help="cache name, or * for every cache")
    create.add_argument("--scope", required=True, choices=["read", "write", "admin"])
    create.add_argument("--ttl", default="30d", help="lifetime: 30d, 12h, 15m, or 0 for none")
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    _common(revoke)
    revoke.add_argument("token_id")
    revoke.add_argument("--reason", default="")
    replace_secret = token_commands.add_parser(
        "replace-secret",
        help="sign tokens with a new secret: every token made before stops working within "
        "refresh_interval",
    )
    _common(replace_secret)

    cache = commands.add_parser(
        "cache", help="create, inspect and change caches (privacy, keys, limits)"
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_create = cache_commands.add_parser("create", help="create a cache and its key")
    _common(cache_create)
    cache_create.add_argument("name")
    cache_create.add_argument("--private", action="store_true", help="reads need a token")
    cache_create.add_argument("--priority", type=int, help="nix-cache-info Priority")
    cache_create.add_argument("--key-name", help="signing key name (default NAME.larder-XXXXXX)")
    cache_show = cache_commands.add_parser("show", help="print a cache's settings as JSON")
    _common(cache_show)
    cache_show.add_argument("name")
    rotate = cache_commands.add_parser(
        "rotate-key",
        help="give a cache a new signing key (servers sign with it within refresh_interval)",
    )
    _common(rotate)
    rotate.add_argument("name")
    new_key = rotate.add_mutually_exclusive_group()  # a key file names its key
    new_key.add_argument("--key-name", help="name of the new key (default NAME.larder-XXXXXX)")
    new_key.add_argument(
        "--key-file", help="use this Nix secret key (name:base64, as nix-store generates)"
    )
    trust = cache_commands.add_parser(
        "trust", help="require uploaded narinfos to be signed by one of these keys"
    )
    _common(trust)
    trust.add_argument("name")
    trust.add_argument(
        "--key", action="append", default=[], help="public key name:base64 (repeat; none: off)"
    )
    limits = cache_commands.add_parser(
        "limits",
        help="set a cache's garbage-collection limits (0 or none: no limit, not even gc_retention;"
        " default: drop the cache's own limit)",
    )
    _common(limits)
    limits.add_argument("name")
    limits.add_argument("--max-size", help="largest size, e.g. 50GB, 200GiB")
    limits.add_argument(
        "--retention",
        help="evict what was not used for this long, e.g. 30d (default: gc_retention applies)",
    )
    cache_set = cache_commands.add_parser(
        "set", help="change a cache's privacy or priority (servers follow within refresh_interval)"
    )
    _common(cache_set)
    cache_set.add_argument("name")
    privacy = cache_set.add_mutually_exclusive_group()
    privacy.add_argument("--private", action="store_true", default=None, help="reads need a token")
    privacy.add_argument("--public", dest="private", action="store_false", help="anyone may read")
    cache_set.add_argument("--priority", type=int, help="nix-cache-info Priority")
    cache_list = cache_commands.add_parser("list", help="list caches")
    _common(cache_list)

    gc = commands.add_parser("gc", help="evict least recently used closures once, and exit")
    _common(gc)
    gc.add_argument("--cache", help="judge only this cache (default: every cache)")
    gc.add_argument(
        "--max-size", help="with --cache: that cache's cap; without: the whole store's cap"
    )
    gc.add_argument(
        "--retention", help="evict what was not used for this long (e.g. 30d; 0: no retention)"
    )
    gc.add_argument("--grace", help="keep what was used this recently (default: gc_grace)")
    gc.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")

    check = commands.add_parser(
        "verify",
        help="check every stored blob and record; exit 1 if anything is damaged",
    )
    _common(check)
    check.add_argument(
        "--repair",
        action="store_true",
        help="remove what is damaged, so the next upload stores it again",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    for verb, text in (
        ("pin", "exempt store paths and their closures from eviction"),
        ("unpin", "remove pins"),
    ):
        command = commands.add_parser(verb, help=text)
        _common(command)
        command.add_argument("--cache", default=DEFAULT_CACHE, help="cache (default main)")
        command.add_argument(
            "paths",
            nargs="*",
            help="/nix/store/<hash>-<name>, <hash>-<name> or <hash>"
            + (" (none: list the pins)" if verb == "pin" else ""),
        )
        if verb == "pin":
            command.add_argument("--note", default="", help="why (shown in the list)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    flags: dict[str, Any] = {"storage": getattr(args, "storage", None), "config": args.config}
    if args.command == "serve":
        flags.update(listen=args.listen, public_url=args.public_url, workers=args.workers)
    if args.command == "gc":
        flags.update(gc_grace=args.grace)
    return load_config(flags, flag_names={"gc_grace": "--grace"})


async def _with_storage(
    config: Config, action: Callable[[Storage], Awaitable[int]], create: bool
) -> int:
    """Run ``action`` on the configured store; only ``create`` makes a disk store that is not
    there (a mistyped ``--storage`` for a command that reads must not leave a new store behind)."""
    try:
        storage = open_storage(
            config.storage,
            zstd_level=config.zstd_level,
            create=create,
            timeout=config.storage_timeout,
        )
    except StorageUnavailable as exc:
        raise LarderError(
            f"{exc.message} (`larder serve` or `larder cache create` makes one)"
        ) from None
    try:
        if create:  # `cache create`, which sets a store up: as `larder serve` does at start
            await storage.check_writes()
        return await action(storage)
    finally:
        await storage.close()


def _describe(settings: CacheSettings, base_url: str) -> dict[str, Any]:
    return {
        "name": settings.name,
        "public_key": settings.public_key.to_string(),
        "substituter": f"{base_url}/{settings.name}",
        "private": settings.private,
        "priority": settings.priority,
        "trusted_upload_keys": list(settings.trusted_upload_keys),
        "gc_max_size": settings.gc_max_size,
        "gc_retention": settings.gc_retention,
    }


def _base_url(config: Config) -> str:
    return config.public_url or healthcheck.local_url(config.listen)


async def _adopt_signing_keys(config: Config, registry: CacheRegistry) -> None:
    """``signing_keys_dir``: each ``<cache>.key`` becomes that cache's signing key."""
    if not config.signing_keys_dir:
        return
    directory = Path(config.signing_keys_dir)
    if not directory.is_dir():  # a Secret mounted elsewhere must not go unnoticed
        raise LarderError(f"signing_keys_dir {directory} is not a directory")
    try:
        files = sorted(directory.glob("*.key"))
    except OSError as exc:
        raise LarderError(f"cannot read signing_keys_dir {directory}: {exc}") from None
    for path in files:
        try:
            key = SecretKey.parse(path.read_text().strip())
        except OSError as exc:
            raise LarderError(f"cannot read {path}: {exc}") from None
        except LarderError as exc:
            raise LarderError(f"{path}: not a Nix secret key ({exc.message})") from None
        what = await registry.adopt_key(
            path.stem,
            key,
            priority=config.default_priority,
            private=path.stem in config.private_cache_names,
        )
        if what != "unchanged":
            print(f"cache {path.stem!r}: {what} with the key in {path.name}", flush=True)


async def _make_private(config: Config, registry: CacheRegistry) -> None:
    """``private_caches``: each exists and is private (one left out keeps what it is)."""
    for name in config.private_cache_names:
        settings, created = await registry.ensure(name, config.default_priority, private=True)
        if created:
            print(f"created private cache {name!r} and its signing key", flush=True)
        elif not settings.private:
            await registry.update(replace(settings, private=True))
            print(f"cache {name!r}: made private (private_caches)", flush=True)


def _command() -> str:
    """``larder`` as the user can run it again: ``larder`` where PATH finds this one, else the
    script as it was invoked (``.venv/bin/larder`` after ``make run``) or ``python -m larder``."""
    invoked = sys.argv[0]
    if Path(invoked).name == "__main__.py":
        return f"{sys.executable} -m larder"
    found = shutil.which("larder")
    if "/" not in invoked or (found and Path(found).resolve() == Path(invoked).resolve()):
        return "larder"
    return invoked


def _token_command(config: Config) -> str:
    """``token create`` for this store as a shell runs it: quoted, with the mounted secret."""
    command = f"{_command()} token create --storage {shlex.quote(config.storage)}"
    if config.token_secret_file:
        return f"LARDER_TOKEN_SECRET_FILE={shlex.quote(config.token_secret_file)} {command}"
    return command


async def _bootstrap(config: Config, storage: Storage) -> None:
    """Adopt configured keys and private caches; with no cache at all (none configured either)
    create ``main``. Always print how to use the caches. First, once per start, check that the
    store gives back the bytes written to it (a store that keeps an upload's transfer encoding
    as its content would otherwise corrupt every object, found only when read)."""
    await storage.check_writes()
    read_secret = config.mounted_token_secret()
    await record_secret_source(storage, read_secret() if read_secret else None)
    registry = CacheRegistry(storage, config.refresh_interval)
    await _adopt_signing_keys(config, registry)
    await _make_private(config, registry)
    names = await registry.names()
    if not names:
        await registry.ensure(DEFAULT_CACHE, priority=config.default_priority)
        names = [DEFAULT_CACHE]
        print(f"created cache {DEFAULT_CACHE!r} and its signing key", flush=True)
    base = _base_url(config)
    print(f"larder serving on {base}", flush=True)
    for name in names:
        settings = await registry.get(name)
        if settings is None:
            continue
        print(
            f"cache {name}: substituter {base}/{name}\n"
            f"  trusted-public-keys: {settings.public_key.to_string()}\n"
            f"  write token: {_token_command(config)} --cache {name} --scope write",
            flush=True,
        )


def _serve(config: Config, argv: Sequence[str]) -> int:
    return serve(config, _bootstrap, [sys.executable, "-m", "larder", *argv])


async def _token_create(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    cache = args.cache if args.cache == "*" else check_cache_name(args.cache)
    if cache != "*" and await CacheRegistry(storage).get(cache) is None:
        raise LarderError(f"no cache named {cache!r}")
    read_secret = config.mounted_token_secret()
    await check_secret_source(storage, read_secret() if read_secret else None)
    authority = TokenAuthority(storage, config.refresh_interval, mounted=read_secret)
    token, claims = await authority.issue(cache, Scope.parse(args.scope), parse_ttl(args.ttl))
    print(token)
    expiry = "never"
    if claims.expires_at:
        when = datetime.fromtimestamp(claims.expires_at, UTC)
        expiry = f"{when:%Y-%m-%dT%H:%M:%SZ} ({claims.expires_at})"
    print(f"token id {claims.token_id}, scope {args.scope}, expires {expiry}", file=sys.stderr)
    if claims.expires_at:
        skew = await store_now(storage, claims.token_id, time.time) - time.time()
        if abs(skew) > CLOCK_WARNING:
            print(
                f"warning: this host's clock is {abs(skew):.0f} s "
                f"{'behind' if skew > 0 else 'ahead of'} the store's; servers count the expiry "
                "by their own clocks",
                file=sys.stderr,
            )
    return 0


async def _token_revoke(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    await TokenAuthority(
        storage, config.refresh_interval, mounted=config.mounted_token_secret()
    ).revoke(args.token_id, args.reason)
    print(f"revoked {args.token_id}", file=sys.stderr)
    return 0


async def _token_replace_secret(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    read_secret = config.mounted_token_secret()
    if read_secret is None:
        await check_secret_source(storage, None, replacing=True)
    await TokenAuthority(storage, mounted=read_secret).replace_secret()
    print(
        "replaced the token secret: tokens made before it stop working within "
        f"refresh_interval ({config.refresh_interval:g} s; replicas of an older release read "
        "it at start only: restart them); make new ones with `larder token create`",
        file=sys.stderr,
    )
    return 0


def _priority(value: int | None, default: int) -> int:
    """``--priority``, or ``default``: what nix-cache-info may carry (Nix reads an int)."""
    if value is None:
        return default
    if not 0 <= value < 2**31:
        raise LarderError(f"--priority must be between 0 and {2**31 - 1}")
    return value


async def _cache_command(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    registry = CacheRegistry(storage, config.refresh_interval)
    if args.cache_command == "list":
        for name in await registry.names():
            print(name)
        return 0
    if args.cache_command == "create":
        settings = await registry.create(
            args.name,
            private=args.private,
            priority=_priority(args.priority, config.default_priority),
            key_name=args.key_name,
        )
    else:
        found = await registry.get(check_cache_name(args.name))
        if found is None:
            raise LarderError(f"no cache named {args.name!r}")
        settings = found
        if args.cache_command == "trust":
            trusted = tuple(PublicKey.parse(key).to_string() for key in args.key)
            settings = replace(settings, trusted_upload_keys=trusted)
            await registry.update(settings)
        if args.cache_command == "set":
            settings = replace(
                settings,
                private=settings.private if args.private is None else args.private,
                priority=_priority(args.priority, settings.priority),
            )
            await registry.update(settings)
        if args.cache_command == "limits":
            settings = replace(
                settings,
                gc_max_size=_limit(args.max_size, parse_size, settings.gc_max_size),
                gc_retention=_limit(args.retention, parse_ttl, settings.gc_retention),
            )
            await registry.update(settings)
        if args.cache_command == "rotate-key":
            settings = await _rotate_key(registry, settings, args.key_name, args.key_file)
    print(json.dumps(_describe(settings, _base_url(config)), indent=2))
    if not config.public_url and config.listen == Config().listen:
        print(
            "substituter: from the default listen address, as neither public_url nor listen "
            "is configured here (set LARDER_PUBLIC_URL to the URL clients use)",
            file=sys.stderr,
        )
    return 0


async def _rotate_key(
    registry: CacheRegistry, settings: CacheSettings, key_name: str | None, key_file: str | None
) -> CacheSettings:
    """Replace the cache's signing key; print the old and new public keys on stderr."""
    if key_file:
        try:
            key = SecretKey.parse(Path(key_file).read_text().strip())
        except OSError as exc:
            raise LarderError(f"cannot read {key_file}: {exc}") from None
    else:
        key = SecretKey.generate(key_name or f"{settings.name}.larder-{secrets.token_hex(3)}")
    rotated = replace(settings, signing_key=key)
    await registry.update(rotated)
    print(
        f"rotated {settings.name}: was {settings.public_key.to_string()}\n"
        f"  now {rotated.public_key.to_string()}\n"
        "  laptops need the new key in trusted-public-keys (keep the old one until they do)",
        file=sys.stderr,
    )
    return rotated


def _limit(text: str | None, parse: Callable[[str], int], current: Any) -> Any:
    """A limit from the command line (a cache's own, or one run's): ``current`` when not given,
    ``0`` for ``0``/``none``/``never`` (no limit, not even the configured one: gc_policies
    never applies it over a 0), ``None`` (the configured one applies) for ``default``."""
    if text is None:
        return current
    word = text.strip().lower()
    if word == "default":
        return None
    if word in ("0", "none", "never"):
        return 0
    try:
        return parse(text)
    except ValueError as exc:
        raise LarderError(f"not a limit: {text!r} ({exc})") from None


async def _gc(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    registry = CacheRegistry(storage, config.refresh_interval)
    settings = await registry.all()
    names = [found.name for found in settings]
    max_size = _limit(args.max_size, parse_size, None)
    retention = _limit(args.retention, parse_ttl, None)
    if args.cache is not None:
        if check_cache_name(args.cache) not in names:
            raise LarderError(f"no cache named {args.cache!r}")
        chosen = [s for s in settings if s.name == args.cache]
        policies = gc_policies(chosen, config, max_size=max_size, retention=retention)
        store = None
    else:
        policies = gc_policies(settings, config, retention=retention)
        store = store_policy(config, max_size)
    report = await Collector(storage).run(
        policies, store, caches=names, grace=config.gc_grace, dry_run=args.dry_run
    )
    print(report.to_json().decode() if args.json else report.render())
    return 0


async def _verify(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    names = [found.name for found in await CacheRegistry(storage).all()]
    report = await verify(storage, names, repair=args.repair)
    print(report.to_json().decode() if args.json else report.render())
    return 0 if report.sound else 1


async def _pin_command(args: argparse.Namespace, storage: Storage, config: Config) -> int:
    cache = check_cache_name(args.cache)
    if await CacheRegistry(storage).get(cache) is None:
        raise LarderError(f"no cache named {cache!r}")
    if args.command == "pin" and not args.paths:
        for found in await pins(storage, cache):
            note = f"  {found.note}" if found.note else ""
            print(f"{found.path}{note}")
        return 0
    for path in args.paths:
        if args.command == "pin":
            pinned = await pin(storage, cache, path, args.note)
            print(f"pinned {pinned.path} in {cache}", file=sys.stderr)
        elif await unpin(storage, cache, path):
            print(f"unpinned {path} in {cache}", file=sys.stderr)
        else:
            print(f"{path} was not pinned in {cache}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would give a traceback
    except BrokenPipeError:  # the reader went away (`larder gc --json | head`): exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if argv[:1] == ["serve"]:  # not a reader's end: say why it stops
            print("larder: standard output was closed", file=sys.stderr)
        return 1
    return code


def _main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad command line (argparse said why): Docker reserves 2
        if exc.code == 2 and argv[:1] == ["healthcheck"]:
            return 1
        raise
    try:
        config = _config(args)
        logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
        # boto3's INFO lines ("Found credentials in environment variables") are not larder's.
        logging.getLogger("botocore").setLevel(max(logging.WARNING, logging.root.level))
        if worker_seat() is None:  # a server's workers: their parent has said it
            for warning in unknown_variables():
                log.warning("%s", warning)
        if args.command == "serve":
            return _serve(config, argv)
        if args.command == "healthcheck":
            return healthcheck.probe(config.listen)
        handlers = {
            ("token", "create"): _token_create,
            ("token", "revoke"): _token_revoke,
            ("token", "replace-secret"): _token_replace_secret,
            ("gc", ""): _gc,
            ("verify", ""): _verify,
            ("pin", ""): _pin_command,
            ("unpin", ""): _pin_command,
        }
        sub: str = args.token_command if args.command == "token" else ""
        handler = handlers.get((str(args.command), sub), _cache_command)
        creates = args.command == "cache" and args.cache_command == "create"
        return asyncio.run(
            _with_storage(config, lambda storage: handler(args, storage, config), creates)
        )
    except LarderError as exc:
        print(f"larder: {exc.message}", file=sys.stderr)
        return 1 if args.command == "healthcheck" else 2  # Docker reserves 2 for health checks


if __name__ == "__main__":
    sys.exit(main())
