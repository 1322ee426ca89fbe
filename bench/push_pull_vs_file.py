"""Real ``nix copy`` to and from larder against the same with a ``file://`` binary cache.

For each compression asked for (``xz``, Nix's default, and ``zstd``), each repetition and each
Nix asked for with ``--nix`` (Debian's nix-bin 2.8 on the machine's store, ``NIX_REMOTE=local``;
Nix 2.34 installed privately, on a chroot store of its own; as root, see ``tests/e2e/nix.py``),
three closures with the same contents but fresh store paths are built with that Nix:
``--paths`` derivations in a chain (each refers to the one before, like crates), ``--size`` bytes
in all, half of them incompressible (seeded pseudo-random bytes), half Rust-like text, read from
one store path holding the data. Then, timed with the wall clock, with the same Nix:

* **push**: ``nix copy --to 'http://127.0.0.1:PORT/main?compression=C'`` (a write token in
  netrc) against ``nix copy --to 'file://DIR?compression=C&secret-key=K'`` for the other
  closure; which side goes first alternates between repetitions;
* **pull**: ``nix copy --from`` each cache ``--to 'local?root=EMPTY'`` (a fresh store in a new
  directory), signatures checked against larder's key and ``K``'s. A pull takes well under a
  second, so each side is pulled ``--pulls`` times, the sides taking turns, and the median
  counts; before the first, ``sync`` writes back what the pushes left dirty, which would
  otherwise slow whichever side pulls first.

A third closure goes the same way through nginx (2 workers; WebDAV ``PUT``, static ``GET``,
narinfos signed by Nix with ``K``): what plain HTTP costs the Nix client, without any of larder's
checks, shown as a second ratio.

Each ``nix`` command gets its own ``XDG_CACHE_HOME``, so no side sees the other's narinfo cache.
larder serves ``.nar.zst`` whatever the upload's compression, while the ``file://`` cache
serves what it was given (so an xz pull decompresses xz there). Both versions push to the same
larder and nginx, one after the other (which goes first alternates between repetitions).

    .venv/bin/python bench/push_pull_vs_file.py [--paths 24] [--size 200MiB]
        [--compression xz,zstd] [--repeat 2] [--pulls 5] [--nix 2.8|2.34|both] [--json]
        [--keep] [--larder-env LARDER_WORKERS=2 ...]

``--keep`` keeps the work directory (larder's log with its access log, nginx's logs).

Goal: larder's time at most 1.25x the ``file://`` time, for push and for pull.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import MiB, larder_server, machine, nginx_server

from larder.service.config import parse_size
from tests.e2e.nix import DEBIAN, NIX_CONFIG, SID, NixVersion  # as the end-to-end tests drive Nix

NIX_VERSIONS = {"2.8": DEBIAN, "2.34": SID}

CLOSURE_NIX = r"""
let
  data = builtins.path { path = @DATA@; name = "bench-data"; };
  mk = i: prev: derivation {
    name = "rust_bench${toString i}-0.1.0";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      export PATH=/usr/bin:/bin
      mkdir -p $out/lib
      cat ${data}/random-${toString i}.bin > $out/lib/libbench${toString i}.rlib
      cat ${data}/text-${toString i}.rs > $out/lib/src.rs
      echo ${prev} > $out/lib/dep
    '' ];
    nonce = "@NONCE@";
  };
  chain = i: if i == 0 then mk 0 "none" else mk i (chain (i - 1));
in chain (@LAST@)
"""


def closure_contents(paths: int, size: int) -> list[tuple[bytes, bytes]]:
    """Per path: incompressible bytes and Rust-like text, half of ``size // paths`` each (the
    same bytes on every run)."""
    rng = random.Random(20261202)
    half = size // paths // 2
    files = []
    for i in range(paths):
        lines, total, n = [], 0, i * 100_000
        random_bytes = rng.randbytes(half)
        while total < half:
            line = f"pub fn item_{n}(x: u64) -> u64 {{ x.wrapping_mul({n * 7919 % 1000003}) }}\n"
            lines.append(line)
            total += len(line)
            n += 1
        files.append((random_bytes, "".join(lines)[:half].encode()))
    return files


def make_data(directory: Path, paths: int, size: int) -> None:
    """Per path: ``random-I.bin`` (incompressible) and ``text-I.rs``, half the bytes each."""
    directory.mkdir(parents=True)
    for i, (random_bytes, text) in enumerate(closure_contents(paths, size)):
        (directory / f"random-{i}.bin").write_bytes(random_bytes)
        (directory / f"text-{i}.rs").write_bytes(text)


class Nix:
    """``nix`` commands of ``version`` with their own narinfo cache directory (one 'machine'
    each) on ``store`` (``NIX_REMOTE``: ``local``, or the directory of a chroot store)."""

    def __init__(
        self, home: Path, version: NixVersion, store: str = "local", netrc: str = ""
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "netrc").write_text(netrc)
        self.version = version
        self.store = store
        self.env = {
            **os.environ,
            "NIX_REMOTE": store,
            "NIX_CONFIG": NIX_CONFIG + f"\nnetrc-file = {home / 'netrc'}\n",
            "XDG_CACHE_HOME": str(home / "cache"),
            "HOME": str(home),
        }

    def run(self, *args: str) -> str:
        command = [self.version.tool(args[0]), *args[1:]]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def timed(self, *args: str) -> float:
        start = time.perf_counter()
        self.run(*args)
        return time.perf_counter() - start

    def beside(self, home: Path, netrc: str = "") -> Nix:
        """Another machine of the same version on the same store (the paths this one built)."""
        return Nix(home, self.version, self.store, netrc)


def builder_for(version: NixVersion, work: Path) -> Nix:
    """The Nix that builds closures with ``version``: on the machine's store, or on a chroot
    store of its own under ``work`` when the version needs one (``own_store``)."""
    home = work / f"build-{version.label}"
    return Nix(home, version, str(home / "root") if version.own_store else "local")


def build_closure(nix: Nix, work: Path, data: Path, paths: int) -> str:
    expr = work / f"closure-{uuid.uuid4().hex}.nix"
    text = CLOSURE_NIX.replace("@DATA@", str(data)).replace("@NONCE@", uuid.uuid4().hex)
    expr.write_text(text.replace("@LAST@", str(paths - 1)))  # DATA: an absolute path
    return nix.run("nix-build", str(expr), "--no-out-link").strip().splitlines()[-1]


def closure_bytes(nix: Nix, top: str) -> tuple[int, int]:
    """Number of paths and NAR bytes of ``top``'s closure."""
    paths = nix.run("nix-store", "-qR", top).split()
    sizes = nix.run("nix-store", "-q", "--size", *paths).split()
    return len(paths), sum(int(s) for s in sizes)


def forget(builder: Nix, top: str) -> None:
    """Delete ``top``'s closure and the derivations that built it, but not the data they read
    (a store path every round uses)."""
    outputs = builder.run("nix-store", "-qR", top).split()
    derivations = builder.run("nix-store", "-qR", builder.run("nix-store", "-qd", top).strip())
    built = [path for path in derivations.split() if path.endswith(".drv")]
    builder.run("nix-store", "--delete", *outputs, *built)


def one_round(
    work: Path, builder: Nix, server_url: str, token: str, public_key: str,
    file_key: tuple[str, str], nginx_url: str, data: Path, paths: int, compression: str,
    larder_first: bool, pulls: int,
) -> dict[str, float]:  # fmt: skip
    """Push a fresh closure to each side with ``builder``'s Nix, then pull each into empty
    stores ``pulls`` times."""
    tag = uuid.uuid4().hex[:8]
    sides = ("larder", "file", "nginx") if larder_first else ("file", "nginx", "larder")
    tops = {side: build_closure(builder, work, data, paths) for side in sides}
    cache_dir = work / f"file-cache-{tag}"
    query = f"compression={compression}"
    signed = f"{query}&secret-key={file_key[0]}"
    targets = {
        "larder": f"{server_url}/main?{query}",
        "file": f"file://{cache_dir}?{signed}",
        "nginx": f"{nginx_url}/{tag}?{signed}",
    }
    netrc = f"machine 127.0.0.1 login bench password {token}\n"
    result: dict[str, float] = {}
    for side in sides:
        nix = builder.beside(work / f"push-{side}-{tag}", netrc=netrc)
        result[f"push_{side}"] = nix.timed("nix", "copy", "--to", targets[side], tops[side])
    sources = {
        "larder": f"{server_url}/main",
        "file": f"file://{cache_dir}",
        "nginx": f"{nginx_url}/{tag}",
    }
    keys = f"{public_key} {file_key[1]}"
    os.sync()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for n in range(pulls):
        for side in sides:
            nix = builder.beside(work / f"pull-{side}-{tag}-{n}")
            root = work / f"store-{side}-{tag}"
            times[side].append(nix.timed(
                "nix", "copy", "--from", sources[side], "--to", f"local?root={root}",
                "--option", "trusted-public-keys", keys, tops[side],
            ))  # fmt: skip
            restored = root / tops[side].lstrip("/")
            if not (restored / "lib" / "dep").exists():
                raise RuntimeError(f"pull from {side} did not restore {tops[side]}")
            shutil.rmtree(root, ignore_errors=True)
    for side in sides:
        result[f"pull_{side}"] = statistics.median(times[side])
    shutil.rmtree(cache_dir, ignore_errors=True)
    result["closure_paths"], result["closure_bytes"] = closure_bytes(builder, tops["larder"])
    for top in tops.values():
        forget(builder, top)
    return result


def installed(version: NixVersion) -> str | None:
    """``version``'s own ``nix --version`` line, or None when it is not installed."""
    try:
        done = subprocess.run([version.tool("nix"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_rounds(
    options: argparse.Namespace, work: Path, versions: dict[str, NixVersion],
    extra: dict[str, str],
) -> list[dict[str, object]]:  # fmt: skip
    """Every compression, repetition and Nix version against one larder and one nginx."""
    data = work / "bench-data"  # its store path is named after it (``nix-store --add``)
    make_data(data, options.paths, parse_size(options.size))
    key_name = f"file-bench-{uuid.uuid4().hex[:6]}"
    secret = work / "file.sec"
    keygen = Nix(work / "keygen", DEBIAN)
    keygen.run("nix-store", "--generate-binary-cache-key", key_name, str(secret),
               str(work / "file.pub"))  # fmt: skip
    file_key = (str(secret), (work / "file.pub").read_text().strip())
    web_root = work / "nginx-root"
    web_root.mkdir()
    dav = (
        f"    root {web_root};\n    client_max_body_size 0;\n"
        "    location / { dav_methods PUT; create_full_put_path on; }\n"
    )
    builders = {name: builder_for(version, work) for name, version in versions.items()}
    rounds: list[dict[str, object]] = []
    try:
        with (
            larder_server(work / "larder-data", work, extra_env=extra) as server,
            nginx_server(work / "nginx", dav, workers=2) as nginx,
        ):
            token = server.token()
            info = json.loads(server.cli("cache", "show", "main").stdout)
            for compression in options.compression.split(","):
                for n in range(options.repeat):
                    order = list(builders.items())
                    for name, builder in order if n % 2 == 0 else order[::-1]:
                        figures = one_round(
                            work, builder, server.url, token, info["public_key"], file_key,
                            nginx.url, data, options.paths, compression,
                            larder_first=n % 2 == 0, pulls=options.pulls,
                        )  # fmt: skip
                        rounds.append(
                            {"compression": compression, "nix": name, "run": n + 1, **figures}
                        )
    finally:
        for builder in builders.values():  # the data's store path, kept by every round
            try:
                stored = builder.run("nix-store", "--add", str(data)).strip()
                builder.run("nix-store", "--delete", stored)
            except RuntimeError as error:  # a round that failed left its derivations behind
                print(f"the data stays in {builder.store}'s store: {error}", file=sys.stderr)
    return rounds


def print_table(report: dict[str, object], extra: dict[str, str]) -> None:
    rounds: list[dict[str, object]] = report["rounds"]  # type: ignore[assignment]
    print(f"nix copy, larder against file://; machine {report['machine']}; larder env {extra}")
    print(f"nix: {report['nix']}")
    columns = f"{'file':>6s} {'nginx':>6s} {'ratio':>5s} {'/nginx':>6s}"
    print(f"{'compression':12s}{'nix':>5s}{'run':>4s} {'paths':>5s} {'MiB':>6s}  "
          f"{'push larder':>11s} {columns}  {'pull larder':>11s} {columns}")  # fmt: skip
    for r in rounds:
        t = {k: float(v) for k, v in r.items() if k.startswith(("push_", "pull_"))}  # type: ignore[arg-type]
        cells = []
        for op in ("push", "pull"):
            ours, file, web = t[f"{op}_larder"], t[f"{op}_file"], t[f"{op}_nginx"]
            ratios = f"{ours / file:5.2f} {ours / web:6.2f}"
            cells.append(f"{ours:10.2f}s {file:5.2f}s {web:5.2f}s {ratios}")
        size = float(r["closure_bytes"]) / MiB  # type: ignore[arg-type]
        print(f"{r['compression']!s:12s}{r['nix']!s:>5s}{r['run']!s:>4s} "
              f"{r['closure_paths']!s:>5s} {size:6.1f}  {cells[0]}  {cells[1]}")  # fmt: skip
    print("ratio = larder's time / file://'s time (goal: at most 1.25); /nginx = larder / nginx")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=24)
    parser.add_argument("--size", default="200MiB")
    parser.add_argument("--compression", default="xz,zstd")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pulls", type=int, default=5, help="pulls per side (median)")
    parser.add_argument("--nix", choices=[*NIX_VERSIONS, "both"], default="both",
                        help="the Nix versions to measure, each in every round")  # fmt: skip
    parser.add_argument("--larder-env", nargs="*", default=[], help="KEY=VALUE for larder")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    chosen = list(NIX_VERSIONS) if options.nix == "both" else [options.nix]
    versions = {name: NIX_VERSIONS[name] for name in chosen}
    found = {name: installed(version) for name, version in versions.items()}
    for name, line in found.items():
        if line is None:
            print(f"Nix {name} is not installed (make system-deps installs both)", file=sys.stderr)
            return 2
    extra = dict(item.split("=", 1) for item in options.larder_env)
    before = machine()
    work = Path(tempfile.mkdtemp(prefix="larder-nixcopy-"))
    try:
        rounds = run_rounds(options, work, versions, extra)
    finally:
        if options.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, object] = {
        "machine": {**before, "loadavg_after": machine()["loadavg"]},
        "larder_env": extra,
        "nix": found,
        "rounds": rounds,
    }
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
