"""The ``larder-rustc`` command's entry point: leave rustc alone as cheaply as possible.

Cargo calls the wrapper for probes (``rustc -vV``, ``rustc - --print=...``) as well as for
compilations. Those probes, and every call when the cache is disabled or not configured, are
handed to rustc with ``exec`` after importing nothing but ``os``, ``sys`` and the leaf module
:mod:`larder.client.probe`. A compilation is handed to the resident process
(:mod:`larder.client.resident`), which has the shim loaded already; only when there is none, or
it declines, does this process load the rest of the shim.
"""

# No `from __future__ import annotations`: importing __future__ costs the probe path ~0.2 ms.
import os
import sys

from larder.client.probe import cache_enabled, is_probe, startup_ms


def main() -> int:
    argv = sys.argv[1:]
    rustc_call = bool(argv) and not argv[0].startswith("-") and argv[0] != "explain"
    if rustc_call and (not cache_enabled(os.environ) or is_probe(argv[1:])):
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"larder-rustc: cannot run {argv[0]}: {exc}", file=sys.stderr)
            return 127
    absent = False
    if rustc_call:
        from larder.client import resident

        if resident.enabled(os.environ):
            startup = startup_ms() if os.environ.get("LARDER_LOG") else 0.0
            code = resident.delegate(argv, startup)
            if isinstance(code, int):
                return code
            absent = code == resident.ABSENT
    from larder.client.shim import main as shim_main

    if absent:
        resident.start(dict(os.environ))
    return shim_main(argv)


if __name__ == "__main__":
    sys.exit(main())
