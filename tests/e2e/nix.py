"""Driving the real Nix client (Debian's nix-bin, as root, local store, no sandbox)."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
  mid = mk "rust_mid-0.2.1" ''
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
    """One Nix 'machine': its own narinfo cache dir and netrc, sharing the root store."""

    home: Path
    netrc: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        netrc_path = self.home / "netrc"
        netrc_path.write_text(self.netrc)
        self.env = {
            **os.environ,
            "NIX_REMOTE": "local",
            "NIX_CONFIG": NIX_CONFIG + f"\nnetrc-file = {netrc_path}\n",
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "HOME": str(self.home),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=300)
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

    def closure(self, path: str) -> list[str]:
        return sorted(self.run("nix-store", "-qR", path).stdout.split())

    def copy_to(
        self, url: str, *paths: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("nix", "copy", "--to", url, *paths, check=check)

    def delete(self, *paths: str) -> None:
        self.run("nix-store", "--delete", *paths)
        for path in paths:
            assert not Path(path).exists(), f"{path} survived deletion"

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
