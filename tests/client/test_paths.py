"""Portable paths: roots in, placeholders out, and back on another machine."""

from __future__ import annotations

from pathlib import Path

from larder.client.paths import Roots, find_target_dir

CI = Roots.of(
    CWD=Path("/ci/work/app"),
    TARGET=Path("/ci/work/app/target"),
    CARGO_HOME=Path("/home/ci/.cargo"),
)
LAPTOP = Roots.of(
    CWD=Path("/home/me/src/app"),
    TARGET=Path("/tmp/target-me"),
    CARGO_HOME=Path("/home/me/.cargo"),
)


def test_portable_text_is_the_same_from_both_machines() -> None:
    ci = "error at /ci/work/app/src/lib.rs and /ci/work/app/target/debug/build/x/out/a.rs"
    laptop = "error at /home/me/src/app/src/lib.rs and /tmp/target-me/debug/build/x/out/a.rs"
    assert CI.portable(ci) == LAPTOP.portable(laptop)
    assert "@LARDER:TARGET@/debug/build" in CI.portable(ci)  # most specific root wins


def test_local_maps_placeholders_to_this_machine() -> None:
    text = CI.portable("/ci/work/app/target/debug/deps/leaf.d: /home/ci/.cargo/registry/x.rs")
    assert LAPTOP.local(text) == ("/tmp/target-me/debug/deps/leaf.d: /home/me/.cargo/registry/x.rs")


def test_roots_match_whole_components_only() -> None:
    assert CI.portable("/ci/work/app2/src") == "/ci/work/app2/src"
    assert CI.portable("/ci/work/app.old") == "/ci/work/app.old"
    assert CI.portable('"/ci/work/app"') == '"@LARDER:CWD@"'
    assert CI.portable("/ci/work/app:1") == "@LARDER:CWD@:1"


def test_relative_paths_stay_and_shallow_roots_are_ignored() -> None:
    assert CI.portable_path("crates/leaf/src/lib.rs") == "crates/leaf/src/lib.rs"
    shallow = Roots.of(CWD=Path("/"), TARGET=Path("/tmp"), CARGO_HOME=None)
    assert shallow.roots == ()
    assert shallow.portable("/tmp/x") == "/tmp/x"
    assert shallow.remap_flags() == []


def test_remap_flags_put_the_most_specific_root_last() -> None:
    flags = CI.remap_flags()
    assert flags == [
        "--remap-path-prefix=/ci/work/app=.",
        "--remap-path-prefix=/home/ci/.cargo=/larder/cargo-home",
        "--remap-path-prefix=/ci/work/app/target=/larder/target",
    ]


def test_target_dir_is_found_by_cargos_tag(tmp_path: Path) -> None:
    target = tmp_path / "custom-target"
    deps = target / "x86_64-unknown-linux-gnu" / "release" / "deps"
    deps.mkdir(parents=True)
    (target / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    assert find_target_dir(deps) == target
    untagged = tmp_path / "plain" / "debug" / "deps"
    untagged.mkdir(parents=True)
    assert find_target_dir(untagged) == tmp_path / "plain"
