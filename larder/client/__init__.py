"""``larder-rustc``: a ``RUSTC_WRAPPER`` that caches rustc compilations in a larder cache.

* :mod:`~larder.client.args`     what a rustc command line asks for, and whether it is cacheable.
* :mod:`~larder.client.paths`    the machine-specific roots (checkout, target dir, CARGO_HOME)
  and how paths are made portable and mapped back.
* :mod:`~larder.client.depinfo`  rustc's Makefile-style dep-info files.
* :mod:`~larder.client.key`      the cache key: its numbered inputs and how they are collected.
* :mod:`~larder.client.remote`   the HTTP client for ``/<cache>/rustc/`` (short timeouts).
* :mod:`~larder.client.stats`    per-user counters that survive across invocations.
* :mod:`~larder.client.shim`     the command itself: hit, miss, pass-through.

The shim imports only the standard library, ``blake3`` and ``zstandard``, so that starting it
costs little next to rustc.
"""
