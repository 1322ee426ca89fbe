"""Inputs documents and the sorting of key differences into miss categories."""

from __future__ import annotations

import json
from typing import Any

import pytest

from larder.errors import FormatError
from larder.protocol.inputs import (
    CATEGORIES,
    Identity,
    InputsDocument,
    explain,
    pack_stored,
    parse_document,
    parse_nearest,
    redact,
    stored_identity,
    unpack_stored,
)

IDENTITY = Identity("leaf", "leaf", "0.1.0", "lib", "x86_64-unknown-linux-gnu")
TARGET = "@LARDER:TARGET@/debug/build/generated-1/out"


def inputs(**changes: Any) -> dict[str, Any]:
    """A key document as larder.client.key writes it (lists, as after JSON)."""
    doc: dict[str, Any] = {
        "format": "larder-rustc/1",
        "rustc": "rustc 1.85.0\nhost: x86_64-unknown-linux-gnu\nLLVM version: 19.1.7\n",
        "sysroot": [["libstd-1.rlib", "aa"], ["libcore-1.rlib", "bb"]],
        "args": [
            "--crate-name=leaf", "--edition=2021", "--crate-type=lib", "-C=opt-level=0",
            "-C=metadata=abc", "-C=extra-filename=-abc", "--extern=itoa", "crates/leaf/src/lib.rs",
        ],
        "sources": [["crates/leaf/src/lib.rs", "11"], [f"{TARGET}/squares.rs", "22"]],
        "env_deps": [["GREETING", None]],
        "externs": [["itoa", "33"]],
        "cargo_env": [["CARGO_PKG_NAME", "leaf"]],
        "out_dir": [["squares.rs", "22"]],
        "native": [],
    }  # fmt: skip
    doc.update(changes)
    return doc


def categories(current: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    found = explain(current, [("k" * 64, inputs())])
    return found.category, [(d.category, d.item) for d in found.differences]


def with_arg(old: str | None, new: str | None) -> list[str]:
    args = [a for a in inputs()["args"] if a != old]
    return [*args, new] if new else args


@pytest.mark.parametrize(
    ("current", "category", "item"),
    [
        (inputs(rustc="rustc 1.86.0\nhost: x86_64-unknown-linux-gnu\n"), "toolchain", "rustc -vV"),
        (inputs(sysroot=[["libstd-1.rlib", "ff"], ["libcore-1.rlib", "bb"]]), "toolchain",
         "sysroot libstd-1.rlib"),
        (inputs(args=with_arg(None, "-C=target-cpu=native")), "flags", "-C target-cpu=native"),
        (inputs(args=with_arg("-C=opt-level=0", "-C=opt-level=3")), "flags", "-C opt-level=0"),
        (inputs(args=with_arg(None, '--cfg=feature="shout"')), "features", '--cfg=feature="shout"'),
        (inputs(sources=[["crates/leaf/src/lib.rs", "99"], [f"{TARGET}/squares.rs", "22"]]),
         "source", "crates/leaf/src/lib.rs"),
        (inputs(env_deps=[["GREETING", "bonjour"]]), "env", "GREETING"),
        (inputs(externs=[["itoa", "44"]]), "dependency", "itoa"),
        (inputs(out_dir=[["squares.rs", "23"]], sources=[["crates/leaf/src/lib.rs", "11"],
                [f"{TARGET}/squares.rs", "23"]]), "build_script", "squares.rs"),
        (inputs(native=[["answer", "55"]]), "link", "answer"),
        (inputs(link={"line": ["cc"], "linker": {"driver": "cc 13"}}), "link", "link"),
        (inputs(args=with_arg("-C=metadata=abc", "-C=metadata=def")), "flags", "-C metadata=def"),
    ],
)  # fmt: skip
def test_each_input_has_its_category(current: dict[str, Any], category: str, item: str) -> None:
    main, found = categories(current)
    assert main == category
    assert (category, item) in found


def test_own_inputs_come_before_dependencies_and_derived_flags_are_consequences() -> None:
    # A feature changes the crate's -C metadata too: only the feature is named.
    current = inputs(args=[*with_arg("-C=metadata=abc", "-C=metadata=new"), '--cfg=feature="x"'])
    assert categories(current) == ("features", [("features", '--cfg=feature="x"')])
    # A dependent: its extern and its metadata changed, nothing of its own.
    current = inputs(externs=[["itoa", "44"]], args=with_arg("-C=metadata=abc", "-C=metadata=z"))
    assert categories(current) == ("dependency", [("dependency", "itoa")])
    # Its own source and a dependency: the source is the reason.
    edited = [["crates/leaf/src/lib.rs", "0"], [f"{TARGET}/squares.rs", "22"]]
    current = inputs(externs=[["itoa", "44"]], sources=edited)
    assert categories(current)[0] == "source"


def test_a_linked_crate_whose_dependency_changed_misses_for_the_dependency() -> None:
    """The link reads the dependency's rlib too: its new digest there is the dependency's
    change, not the link's; another link input that changed still counts."""
    rlib = "@LARDER:TARGET@/debug/deps/libitoa-1.rlib"
    link = {"line": ["cc"], "inputs": [[rlib, "33"], ["/usr/lib/libz.a", "66"]], "env": []}
    stored = inputs(link=link)
    relinked = {**link, "inputs": [[rlib, "44"], ["/usr/lib/libz.a", "66"]]}
    current = inputs(externs=[["itoa", "44"]], link=relinked)
    found = explain(current, [("k" * 64, stored)])
    assert (found.category, [(d.category, d.item) for d in found.differences]) == (
        "dependency",
        [("dependency", "itoa")],
    )
    both = {**link, "inputs": [[rlib, "44"], ["/usr/lib/libz.a", "77"]]}
    found = explain(inputs(externs=[["itoa", "44"]], link=both), [("k" * 64, stored)])
    assert found.category == "link"
    assert ("link", "/usr/lib/libz.a") in [(d.category, d.item) for d in found.differences]
    # A new version of the dependency: a new rlib name, in the inputs and in the link line.
    line = ["cc", rlib, "-lz"]
    stored = inputs(link={**link, "line": line})
    renamed = rlib.replace("-1.rlib", "-2.rlib")
    bumped = {**link, "line": ["cc", renamed, "-lz"],
              "inputs": [[renamed, "44"], ["/usr/lib/libz.a", "66"]]}  # fmt: skip
    found = explain(inputs(externs=[["itoa", "44"]], link=bumped), [("k" * 64, stored)])
    assert (found.category, [(d.category, d.item) for d in found.differences]) == (
        "dependency",
        [("dependency", "itoa")],
    )
    relinked = {**bumped, "line": ["cc", renamed, "-lz", "-lm"]}  # and the line changed too
    found = explain(inputs(externs=[["itoa", "44"]], link=relinked), [("k" * 64, stored)])
    assert found.category == "link"
    # A crate further down (an rlib on the link line, no --extern of this crate's) changed.
    leaf = "@LARDER:TARGET@/debug/deps/libleaf-1.rlib"
    deep = {**link, "line": ["cc", rlib, leaf], "inputs": [*link["inputs"], [leaf, "70"]]}
    stored = inputs(link=deep)
    edited = {**deep, "inputs": [*link["inputs"], [leaf, "71"]]}
    found = explain(inputs(link=edited), [("k" * 64, stored)])
    assert (found.category, [(d.category, d.item) for d in found.differences]) == (
        "dependency",
        [("dependency", "libleaf-1.rlib")],
    )
    bumped = {**deep, "line": ["cc", rlib, leaf.replace("-1", "-2")],
              "inputs": [*link["inputs"], [leaf.replace("-1", "-2"), "72"]]}  # fmt: skip
    found = explain(inputs(externs=[["itoa", "44"]], link=bumped), [("k" * 64, stored)])
    assert found.category == "dependency"


def test_a_stored_link_of_any_shape_is_compared_without_failing() -> None:
    """A stored document is whatever the cache holds (found by fuzz.rustc_inputs): lists where
    strings belong in the line, digests and externs."""
    rlib = "@LARDER:TARGET@/debug/deps/libitoa-1.rlib"
    odd = {"line": [["cc"], rlib, {"x": 1}], "inputs": [[rlib, ["33"]], [["a"], "b"]]}
    stored = inputs(externs=[["itoa", ["33"]], ["x", {"y": 2}]], link=odd)
    plain = {"line": ["cc", rlib], "inputs": [[rlib, "44"]]}
    current = inputs(externs=[["itoa", "44"]], link=plain)
    found = explain(current, [("k" * 64, stored)])
    assert found.category in CATEGORIES
    found = explain(stored, [("k" * 64, current)])
    assert found.category in CATEGORIES


def test_never_built_unknown_and_the_nearest_document() -> None:
    assert explain(inputs(), []).category == "never_built"
    same = explain(inputs(), [("a" * 64, inputs())])
    assert same.category == "unknown" and same.nearest == "a" * 64
    far = inputs(rustc="other", externs=[["itoa", "0"]])
    near = inputs(externs=[["itoa", "0"]])
    found = explain(inputs(), [("f" * 64, far), ("n" * 64, near)])
    assert (found.category, found.nearest) == ("dependency", "n" * 64)


def test_a_partial_document_compares_what_it_has() -> None:
    partial = inputs(input=["crates/leaf/src/lib.rs", "12"])
    for name in ("sources", "env_deps"):
        del partial[name]
    main, found = categories(partial)
    assert (main, found) == ("source", [("source", "crates/leaf/src/lib.rs")])
    partial["input"] = ["crates/leaf/src/lib.rs", "11"]
    partial["externs"] = [["itoa", "1"]]
    assert categories(partial)[0] == "dependency"


def test_env_values_are_hashed_unless_safe_and_never_shown() -> None:
    env = [["TOKEN", "hunter2"], ["PROFILE", "debug"]]
    assert '"debug"' not in json.dumps(redact(inputs(env_deps=env), lambda name: False))
    safe = redact(inputs(env_deps=env), lambda name: name == "PROFILE")
    assert "hunter2" not in json.dumps(safe)
    assert ["PROFILE", "debug"] in safe["env_deps"]
    current = redact(inputs(env_deps=[["TOKEN", "swordfish"], ["PROFILE", "release"]]),
                     lambda name: name == "PROFILE")  # fmt: skip
    found = explain(current, [("k" * 64, safe)])
    shown = " ".join(d.render() for d in found.differences)
    assert "hunter2" not in shown and "swordfish" not in shown and "blake3:" in shown
    assert '"debug" -> "release"' in shown
    # The same secret on both sides: no difference, hashed or not.
    again = redact(inputs(env_deps=[["TOKEN", "hunter2"]]), lambda name: False)
    assert explain(inputs(env_deps=[["TOKEN", "hunter2"]]), [("k" * 64, again)]).category == (
        "unknown"
    )


def test_documents_round_trip_through_the_stored_form() -> None:
    document = InputsDocument(IDENTITY, inputs())
    stored = pack_stored(document)
    assert stored_identity(stored) == IDENTITY.id()
    assert parse_document(unpack_stored(stored)) == document
    with pytest.raises(FormatError):
        stored_identity(b"garbage\n")
    with pytest.raises(FormatError):
        unpack_stored(stored[:-5])
    assert parse_nearest(b'{"keys":[{"key":"' + b"a" * 64 + b'","stored":5}]}')[0].stored == 5
    with pytest.raises(FormatError):
        parse_nearest(b'{"keys":[{"key":"../x","stored":5}]}')
    assert len(set(CATEGORIES)) == len(CATEGORIES) == 10
