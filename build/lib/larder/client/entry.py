"""The ``larder-rustc`` command's entry point: leave rustc alone as cheaply as possible.

Cargo calls the wrapper for probes (``rustc -vV``, ``rustc - --print=...``) as well as for
compilations. Those probes, and every call when the cache is disabled or not configured, are
handed to rustc with ``exec`` after importing nothing but ``os``, ``sys`` and the leaf module
:mod:`larder.client.probe`; only a compilation loads the rest of the shim.
"""

# No `from __future__ import annotations`: importing __future__ costs the probe path ~0.2 ms.
import os
import sys

from larder.client.probe import cache_enabled, is_probe


def main() -> int:
    argv = sys.argv[1:]
    if (
        argv
        and not argv[0].startswith("-")
        and argv[0] != "explain"
        and (not cache_enabled(os.environ) or is_probe(argv[1:]))
    ):
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"larder-rustc: cannot run {argv[0]}: {exc}", file=sys.stderr)
            return 127
    from larder.client.shim import main as shim_main

    return shim_main(argv)


if __name__ == "__main__":
    sys.exit(main())
