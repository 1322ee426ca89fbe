"""Fuzz target: the shim's rustc command-line parser (``larder.client.args``).

Input: the arguments cargo passes after the rustc path, NUL-separated (as in
``/proc/<pid>/cmdline``), decoded as Python decodes ``argv``.

Invariant: ``parse`` never raises (the shim must fall back to running rustc, not crash); a
cacheable compilation names a crate and an output directory, lists its expected outputs, and
its re-serialised command line (what the dep-info run uses) parses to the same compilation.
"""

from __future__ import annotations

from fuzz.common import instrumented, main, text

with instrumented():
    from larder.client import args


def one_input(data: bytes) -> None:
    argv = text(data).split("\0") if data else []
    compilation = args.parse(argv)
    assert compilation.reason is None or isinstance(compilation.reason, str)
    compilation.argv()
    compilation.codegen()
    if not compilation.cacheable:
        return
    assert compilation.crate_name and compilation.out_dir is not None
    assert compilation.expected_outputs()
    again = args.parse(compilation.argv())
    assert (again.flags, again.input, again.reason) == (compilation.flags, compilation.input, None)


if __name__ == "__main__":
    main(one_input)
