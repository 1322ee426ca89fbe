"""The README's post-build-hook script, as printed there, run by real Nix with its default
experimental features (no ``nix-command``): each build's output is pushed as it is built, and
with larder down the build still succeeds at once, the failed push logged."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.harness import http, larder_server
from tests.e2e.nix import Nix, NixVersion, netrc_for

pytestmark = pytest.mark.nix

README = Path(__file__).resolve().parents[2] / "README.md"
DRV = """
derivation {
  name = "hooked-@NAME@";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "export PATH=/usr/bin:/bin; mkdir $out; echo @NONCE@ > $out/n" ];
}
"""


def readme_hook() -> str:
    """The shell script the README gives for a post-build-hook."""
    text = README.read_text()
    section = text[text.index("a `post-build-hook`") :]
    match = re.search(r"```sh\n(#!/bin/sh\n.*?)```", section, re.DOTALL)
    assert match is not None, "the README shows no post-build-hook script"
    return match.group(1)


def build(machine: Nix, workdir: Path, name: str, hook: Path) -> tuple[int, str, str]:
    expr = workdir / f"{name}.nix"
    expr.write_text(DRV.replace("@NAME@", name).replace("@NONCE@", uuid.uuid4().hex))
    done = machine.run(
        "nix-build", str(expr), "--no-out-link", "--option", "post-build-hook", str(hook),
        check=False,
    )  # fmt: skip
    return (
        done.returncode,
        done.stdout.strip().splitlines()[-1:][0] if done.stdout else "",
        (done.stderr),
    )


def until(condition: Callable[[], bool], seconds: float = 90) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_readme_hook_pushes_each_build_and_never_fails_one(
    tmp_path: Path, nix_version: NixVersion
) -> None:
    log = tmp_path / "larder-push.log"
    with larder_server(str(tmp_path / "data"), tmp_path) as server:
        netrc = tmp_path / "netrc-larder"
        netrc.write_text(netrc_for(server.token()))
        script = readme_hook().replace("/etc/nix/netrc-larder", str(netrc))
        script = script.replace("/var/log/larder-push.log", str(log))
        script = script.replace("http://larder.example:8080", server.url)
        hook = tmp_path / "hook.sh"
        hook.write_text(script)
        hook.chmod(0o755)
        bindir = str(nix_version.bindir) + os.pathsep if nix_version.bindir else ""
        ci = Nix(tmp_path / "ci", version=nix_version)
        ci.env["PATH"] = bindir + ci.env["PATH"]  # the hook's nix is the building Nix's
        defaults = [line for line in ci.env["NIX_CONFIG"].splitlines()
                    if not line.startswith("experimental-features")]  # fmt: skip
        ci.env["NIX_CONFIG"] = "\n".join(defaults)
        code, path, stderr = build(ci, tmp_path, "pushed", hook)
        assert code == 0, stderr
        narinfo = f"{server.url}/main/{Path(path).name[:32]}.narinfo"
        pushed = until(lambda: http("GET", narinfo)[0] == 200)
        assert pushed, log.read_text() if log.exists() else stderr
    # larder is gone: the build stands at once, and the failed push is logged.
    started = time.monotonic()
    code, path, stderr = build(ci, tmp_path, "unpushed", hook)
    assert code == 0 and time.monotonic() - started < 30, stderr
    assert ci.exists(path)
    assert until(lambda: "larder: push of" in log.read_text()), log.read_text()
