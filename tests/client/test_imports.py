"""What a compilation's process imports: cargo starts one per crate, so every module counts.

Each check runs in a fresh interpreter (this one has imported everything) and lists the
modules it loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.client.test_transport import OK, Script

# Imported by the shim only where needed: running rustc (subprocess, threading), a hit
# (zstandard), https (ssl), a miss (explain, inputs), an upload (uploads, shutil), a link
# (linker). http.client, email and urllib.request are never needed.
NOT_ON_IMPORT = (
    "email",
    "encodings.idna",
    "http.client",
    "larder.client.explain",
    "larder.client.linker",
    "larder.client.uploads",
    "larder.protocol.inputs",
    "shutil",
    "ssl",
    "subprocess",
    "threading",
    "urllib.request",
    "zstandard",
)
# What getaddrinfo and ssl load to encode a str host name (the idna codec).
IDNA = ("encodings.idna", "stringprep", "unicodedata")


def modules_after(code: str) -> set[str]:
    """The modules a new interpreter holds after running ``code``."""
    listing = "\nimport sys\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code + listing],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("LARDER_")},
    )
    return set(done.stdout.split())


def test_importing_the_shim_loads_only_what_every_compilation_needs() -> None:
    loaded = modules_after("import larder.client.shim")
    assert "larder.client.remote" in loaded  # the listing works
    assert sorted(loaded.intersection(NOT_ON_IMPORT)) == []


def test_a_request_to_an_ascii_host_does_not_load_the_idna_codec() -> None:
    server = Script([[OK]])
    try:
        loaded = modules_after(
            "from larder.client.transport import Connection\n"
            f"conn = Connection('127.0.0.1', {server.port}, tls=False, timeout=5)\n"
            "assert conn.request('GET', '/', {}).read() == b'hello'\n"
            "conn.close()"
        )
    finally:
        server.close()
    assert sorted(loaded.intersection(IDNA)) == []


def test_queueing_an_upload_by_hard_links_does_not_load_shutil(tmp_path: Path) -> None:
    output = tmp_path / "libx.rlib"
    output.write_bytes(b"rlib")
    loaded = modules_after(
        "from pathlib import Path\n"
        "from larder.client import uploads\n"
        f"job = uploads.enqueue(Path({str(tmp_path / 'spool')!r}), {{'key': 'k'}},"
        f" {{'b' * 64: Path({str(output)!r})}}, {{'c' * 64: b'dep-info'}})\n"
        "assert (job / ('b' * 64)).read_bytes() == b'rlib'"
    )
    assert "larder.client.uploads" in loaded
    assert "shutil" not in loaded
