"""Driving the real Nix clients: Debian's nix-bin (2.8) and sid's (2.34), as root, no sandbox.

Every test that drives Nix runs against both (the ``nix_version`` fixture). Debian's Nix uses
the machine's own store, shared by every role; sid's, installed privately by
``tools/install-nix-sid.sh``, gets a chroot store of its own per role (``NIX_REMOTE=<dir>``, the
paths still under ``/nix/store``), so its CI and laptop really are two machines.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BUILDER_KILLED = "builder failed due to signal 9 (Killed)"
#: Builds again after such a kill before the failure stands.
BUILD_RETRIES = 8
SID_PREFIX = Path(os.environ.get("LARDER_SID_PREFIX", "/opt/nix234"))


@dataclass(frozen=True)
class NixVersion:
    """One Nix release the tests drive."""

    label: str
    bindir: Path | None  # None: found on PATH
    own_store: bool  # each role gets a chroot store under its home

    def tool(self, name: str) -> str:
        return name if self.bindir is None else str(self.bindir / name)

    def check(self) -> None:
        """Fail (never skip) when this Nix is not installed."""
        proc = subprocess.run([self.tool("nix"), "--version"], capture_output=True, text=True)
        assert proc.returncode == 0, f"{self.label} is not installed: {proc.stderr}"


DEBIAN = NixVersion("nix-2.8", None, own_store=False)
SID = NixVersion("nix-sid", SID_PREFIX / "bin", own_store=True)
VERSIONS = (DEBIAN, SID)

NIX_CONFIG = "\n".join(
    [
        "sandbox = false",
        "build-users-group =",
        "experimental-features = nix-command",
        "substituters =",
        "require-sigs = true",
        "connect-timeout = 5",
    ]
)

# Three crate-like derivations: app -> mid -> leaf, app refers to itself, leaf has
# incompressible data, mid has a symlink into leaf. NONCE makes fresh store paths per test.
CLOSURE_NIX = r"""
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "export PATH=/usr/bin:/bin; ${script}" ];
    nonce = "@NONCE@";
  };
  leaf = mk "rust_leaf-1.0.0" ''
    mkdir -p $out/lib; echo leaf > $out/lib/libleaf.rlib
    head -c 300000 /dev/urandom > $out/lib/random.bin
  '';
  # A leading '.' is a valid name (Nix 2.4 and later build and copy such paths).
  mid = mk ".rust_mid-0.2.1" ''
    mkdir -p $out/lib; echo ${leaf} > $out/lib/dep
    ln -s ${leaf}/lib/libleaf.rlib $out/lib/link
  '';
  app = mk "rust_app-0.1.0" ''
    mkdir -p $out/bin; printf '#!/bin/sh\necho ${mid}\n' > $out/bin/app
    chmod +x $out/bin/app; echo $out > $out/self
  '';
in { inherit leaf mid app; }
"""


@dataclass
class Nix:
    """One Nix 'machine': its own narinfo cache dir and netrc; with Debian's Nix it shares the
    machine's store, with sid's it has a store of its own (:attr:`NixVersion.own_store`)."""

    home: Path
    netrc: str = ""
    version: NixVersion = DEBIAN
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        netrc_path = self.home / "netrc"
        netrc_path.write_text(self.netrc)
        self.root = self.home / "root" if self.version.own_store else None
        self.env = {
            **os.environ,
            "NIX_REMOTE": str(self.root) if self.root is not None else "local",
            "NIX_CONFIG": NIX_CONFIG + f"\nnetrc-file = {netrc_path}\n",
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "HOME": str(self.home),
        }

    def real(self, path: str) -> Path:
        """Where store path ``path`` lies on this machine's disk."""
        return Path(path) if self.root is None else self.root / path.lstrip("/")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [self.version.tool(args[0]), *args[1:]]
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300)
        for attempt in range(BUILD_RETRIES):
            if args[0] != "nix-build" or BUILDER_KILLED not in proc.stderr:
                break
            # Nix sometimes kills a builder that exits very quickly (NixOS/nix#2176; seen here
            # about once in a hundred builds, and four times in a row on a loaded machine): the
            # build, not larder, failed; build it again, waiting a little longer each time.
            time.sleep(0.2 * (attempt + 1))
            proc = subprocess.run(
                command, env=self.env, capture_output=True, text=True, timeout=300
            )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def build_closure(self, workdir: Path) -> dict[str, str]:
        """Build leaf, mid and app; return their store paths."""
        expr = workdir / "closure.nix"
        expr.write_text(CLOSURE_NIX.replace("@NONCE@", uuid.uuid4().hex))
        paths = {}
        for attr in ("leaf", "mid", "app"):
            out = self.run("nix-build", str(expr), "-A", attr, "--no-out-link")
            paths[attr] = out.stdout.strip().splitlines()[-1]
        return paths

    def dump(self, path: str) -> bytes:
        """The NAR of store path ``path`` (``nix store dump-path``; ``nix-store --dump`` reads
        the file system, not the store)."""
        command = [self.version.tool("nix"), "store", "dump-path", path]
        return subprocess.run(command, env=self.env, capture_output=True, check=True).stdout

    def exists(self, path: str) -> bool:
        return self.real(path).exists()

    def closure(self, path: str) -> list[str]:
        return sorted(self.run("nix-store", "-qR", path).stdout.split())

    def copy_to(
        self, url: str, *paths: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("nix", "copy", "--to", url, *paths, check=check)

    def delete(self, *paths: str) -> None:
        self.run("nix-store", "--delete", *paths)
        for path in paths:
            assert not self.exists(path), f"{path} survived deletion"

    def substitute(
        self, url: str, public_key: str, path: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "nix-store",
            "-r",
            path,
            "--option",
            "substituters",
            url,
            "--option",
            "trusted-public-keys",
            public_key,
            check=check,
        )


def netrc_for(token: str, host: str = "127.0.0.1") -> str:
    return f"machine {host} login larder password {token}\n"
