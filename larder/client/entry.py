"""The ``larder-rustc`` command's entry point: leave rustc alone as cheaply as possible.

Cargo calls the wrapper for probes (``rustc -vV``, ``rustc - --print=...``) as well as for
compilations. Those probes, and every call when the cache is disabled or not configured, are
handed to rustc with ``exec`` after importing nothing but ``os`` and ``sys``; only a compilation
loads the rest of the shim.
"""

from __future__ import annotations

import os
import sys

# A command line with one of these flags asks rustc for information, not a compilation.
NOT_COMPILATION_FLAGS = frozenset(
    {"--print", "--explain", "-V", "--version", "-vV", "-h", "--help"}
)
TRUE_VALUES = ("1", "true", "yes", "on")


def is_probe(args: list[str]) -> bool:
    """Whether rustc ``args`` ask for information (``--print=x`` counts as ``--print``)."""
    return any(arg.partition("=")[0] in NOT_COMPILATION_FLAGS for arg in args)


def cache_enabled(environ: os._Environ[str] | dict[str, str]) -> bool:
    disabled = environ.get("LARDER_DISABLE", "").lower() in TRUE_VALUES
    return bool(environ.get("LARDER_URL")) and not disabled


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
