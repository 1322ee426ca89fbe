"""`larder serve` as the image runs it: non-root, configured only by the env vars and files the
helm chart sets, with only its data directory writable; real Nix pushes and substitutes."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from larder.protocol.signing import SecretKey
from tests.e2e.harness import free_port, http, stop, wait_for_http
from tests.e2e.nix import Nix, NixVersion, netrc_for

UID = GID = 10001  # the image's user
CONFIGMAP = Path(__file__).resolve().parents[2] / "helm/larder/templates/configmap.yaml"


def chart_env(data: Path, token_file: Path, keys_dir: Path, port: int) -> dict[str, str]:
    """The variables the chart's ConfigMap sets (disk mode, mounted token and key secrets)."""
    data_section = CONFIGMAP.read_text().split("data:", 1)[1]
    names = {
        line.split(":", 1)[0].strip()
        for line in data_section.splitlines()
        if line.strip().startswith(("LARDER_", "AWS_"))
    }
    values = {
        "LARDER_LISTEN": f"127.0.0.1:{port}",  # the chart uses 0.0.0.0:8080 inside the pod
        "LARDER_STORAGE": str(data),
        "LARDER_PUBLIC_URL": "",
        "LARDER_MAX_UPLOAD_SIZE": "16GiB",
        "LARDER_REFRESH_INTERVAL": "10",
        "LARDER_USAGE_INTERVAL": "600",
        "LARDER_LOG_LEVEL": "info",
        "LARDER_ACCESS_LOG": "json",
        "LARDER_TOKEN_SECRET_FILE": str(token_file),
        "LARDER_SIGNING_KEYS_DIR": str(keys_dir),
    }
    assert set(values) <= names, set(values) - names
    return {"PATH": os.environ["PATH"], "HOME": str(data), **values}


def python_for_the_larder_user(tmp: Path) -> str:
    """An interpreter the image's user can run, seeing this checkout and its packages.

    The test's own Python may live where only root can read (a home directory); the system
    CPython of the same version, in a venv whose ``.pth`` names this venv's site-packages and the
    checkout, runs the same code, as the image's Python would.
    """
    system = Path("/usr/bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert system.exists(), f"{system} is needed to run larder as another user"
    venv = tmp / "image-venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and sys.prefix in p)
    (site / "larder-test.pth").write_text(f"{ours}\n{Path(__file__).resolve().parents[2]}\n")
    return str(venv / "bin" / "python")


def as_larder_user(env: dict[str, str], cwd: Path) -> dict[str, object]:
    return {"env": env, "cwd": cwd, "user": UID, "group": GID, "extra_groups": []}


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory the image's user can reach (pytest's tmp_path sits under a root-only dir)."""
    path = Path(tempfile.mkdtemp(prefix="larder-image-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_non_root_process_configured_by_the_chart_serves_nix(
    shared_tmp: Path, nix_version: NixVersion
) -> None:
    tmp_path = shared_tmp
    started = tmp_path / "started"
    started.touch()
    data = tmp_path / "var-lib-larder"
    data.mkdir()
    os.chown(data, UID, GID)
    token_dir = tmp_path / "etc-larder-token"
    token_dir.mkdir()
    token_file = token_dir / "token-secret"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o644)  # a mounted Secret is readable, never writable, by the pod
    keys_dir = tmp_path / "etc-larder-keys"
    keys_dir.mkdir()
    signing_key = SecretKey.generate("main.from-a-secret-1")
    (keys_dir / "main.key").write_text(signing_key.to_string() + "\n")
    (keys_dir / "main.key").chmod(0o644)
    port = free_port()
    env = chart_env(data, token_file, keys_dir, port)
    python = python_for_the_larder_user(tmp_path)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [python, "-m", "larder", "serve"], stdout=log, stderr=subprocess.STDOUT,
        **as_larder_user(env, data),  # type: ignore[arg-type]
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/readyz", proc)
        token = subprocess.run(
            [python, "-m", "larder", "token", "create", "--cache", "main",
             "--scope", "write"],
            capture_output=True, text=True, check=True, **as_larder_user(env, data),  # type: ignore[arg-type]
        ).stdout.strip()  # fmt: skip
        ci = Nix(tmp_path / "ci", netrc=netrc_for(token), version=nix_version)
        paths = ci.build_closure(tmp_path)
        ci.copy_to(f"{url}/main", paths["app"])
        closure = ci.closure(paths["app"])
        ci.delete(*reversed(closure))
        status, body = http("GET", f"{url}/api/v1/caches/main")
        assert status == 200
        key = yaml.safe_load(body)["public_key"]
        assert key == signing_key.public_key().to_string()  # the mounted key signs
        laptop = Nix(tmp_path / "laptop", version=nix_version)
        laptop.substitute(f"{url}/main", key, paths["app"])
        assert all(laptop.exists(p) for p in closure)
    finally:
        stop(proc)
        log.close()
    # The token secret came from the mounted file, not the store; nothing was written outside
    # the data directory.
    assert (data / "objects" / "config" / "caches" / "main.json").exists()
    assert not (data / "objects" / "config" / "token-secret").exists()
    stray = subprocess.run(
        ["find", "/tmp", "-xdev", "-user", str(UID), "-newer", str(started),
         "-not", "-path", f"{data}*"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert stray == []
