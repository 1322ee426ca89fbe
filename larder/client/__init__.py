"""``larder-rustc``: a ``RUSTC_WRAPPER`` that caches rustc compilations in a larder cache.

* :mod:`~larder.client.args`     what a rustc command line asks for, and whether it is cacheable.
* :mod:`~larder.client.paths`    the machine-specific roots (checkout, target dir, CARGO_HOME)
  and how paths are made portable and mapped back.
* :mod:`~larder.client.depinfo`  rustc's Makefile-style dep-info files.
* :mod:`~larder.client.key`      the cache key: its numbered inputs and how they are collected.
* :mod:`~larder.client.remote`   the HTTP client for ``/<cache>/rustc/`` (short timeouts).
* :mod:`~larder.client.stats`    per-user counters that survive across invocations.
* :mod:`~larder.client.toolchain` what identifies the compiler (``rustc -vV``, its sysroot).
* :mod:`~larder.client.linkline` the linker command of a linked crate, in portable form.
* :mod:`~larder.client.linker`   what a link reads besides the compilation (native inputs).
* :mod:`~larder.client.transport` a small HTTP/1.1 client that starts fast (keep-alive).
* :mod:`~larder.client.proxy`    ``https_proxy``/``http_proxy``/``no_proxy`` for that client.
* :mod:`~larder.client.explain`  why a crate missed (``larder-rustc explain``).
* :mod:`~larder.client.leaks`    this machine's paths as an output may hold them (not uploaded).
* :mod:`~larder.client.atomic`   state files replaced whole, no scratch left on failure.
* :mod:`~larder.client.shim`     the command itself: hit, miss, pass-through.
* :mod:`~larder.client.probe`    what is decided before importing anything (cache on? a probe?).
* :mod:`~larder.client.entry`    the console entry point: rustc left alone as cheaply as possible.

The shim imports only the standard library, ``blake3`` and ``zstandard``, so that starting it
costs little next to rustc.
"""
