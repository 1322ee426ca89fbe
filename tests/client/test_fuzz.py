"""The shim's parsers take any command line, dep-info file or text without crashing."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from larder.client import args, depinfo
from larder.client.paths import Roots

ROOTS = Roots.of(CWD=Path("/w/app"), TARGET=Path("/w/app/target"), CARGO_HOME=Path("/h/.cargo"))
tokens = st.one_of(
    st.sampled_from(["--crate-name", "--crate-type", "-C", "--emit", "--out-dir", "-L", "--extern",
                     "--cfg", "-o", "--print", "-vV", "-", "lib", "bin", "src/lib.rs",
                     "incremental=x", "link", "@args"]),
    st.text(max_size=15),
)  # fmt: skip


@given(st.lists(tokens, max_size=20))
def test_any_command_line_parses(argv: list[str]) -> None:
    compilation = args.parse(argv)
    assert compilation.reason is None or isinstance(compilation.reason, str)
    if compilation.cacheable:
        assert compilation.crate_name and compilation.out_dir is not None
        assert compilation.expected_outputs()
        # The dep-info run re-serialises a cacheable command line: it must mean the same.
        again = args.parse(compilation.argv())
        assert (again.flags, again.input, again.reason) == (
            compilation.flags, compilation.input, None,
        )  # fmt: skip


@given(st.text(max_size=500))
def test_any_depinfo_text_parses(text: str) -> None:
    info = depinfo.parse(text)
    assert all(isinstance(f, str) for f in info.files)


@given(st.text(max_size=200))
def test_portable_then_local_is_identity_on_this_machine(text: str) -> None:
    if "@LARDER:" in text:
        return
    assert ROOTS.local(ROOTS.portable(text)) == text
