"""Portable paths: roots in, placeholders out, and back on another machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from larder.client.paths import Roots, find_target_dir, workspace_dir

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
    # A root at the top of the file system (a container's /app) is not the end of a longer
    # path: crates/app/src/main.rs (relative, or under another root) stays as it is.
    container = Roots.of(CWD=Path("/app"), TARGET=Path("/target"), CARGO_HOME=None)
    text = "--> crates/app/src/main.rs:2:9 and /work/app/x, /ws/target/debug, /app/src/lib.rs"
    assert container.portable(text) == (
        "--> crates/app/src/main.rs:2:9 and /work/app/x, /ws/target/debug, @LARDER:CWD@/src/lib.rs"
    )
    # ... but after a flag, a colour change (raw, or escaped in JSON) or file:// it is a root.
    for before in ("-L", "-B", "\x1b[0m", "\\u001b[1;33m", "file://", "=", ":", " ", "\\n", "\\t"):
        assert container.portable(f"{before}/app/src") == f"{before}@LARDER:CWD@/src", before
    for inside in ("/home/josé/app/x", "/appé/x", "/app_old/x", "my_/app/x", "a\\\\n/app"):
        assert container.portable(inside) == inside, inside


def test_diagnostics_name_this_machines_paths_where_the_remaps_wrote_the_shims() -> None:
    """A plain build's warning in generated code names the real target directory; the shim's
    remaps made it ``/larder/target/...``, which is put back for the person reading it."""
    rendered = (
        '{"file_name":"/larder/target/debug/build/gen-0123456789abcdef/out/gen.rs",'
        '"rendered":"\\u001b[0m --> /larder/target/debug/build/x/out/gen.rs:2:4\\n"}'
        " and /larder/cargo-home/git/checkouts/y/src/lib.rs"
    )
    assert LAPTOP.shown(rendered) == (
        '{"file_name":"/tmp/target-me/debug/build/gen-0123456789abcdef/out/gen.rs",'
        '"rendered":"\\u001b[0m --> /tmp/target-me/debug/build/x/out/gen.rs:2:4\\n"}'
        " and /home/me/.cargo/git/checkouts/y/src/lib.rs"
    )
    # Only where the remap starts a path, whole components only; placeholders are local()'s.
    for kept in ("/x/larder/target/a", "/larder/targets/a", "/larder/target2", "@LARDER:CWD@"):
        assert LAPTOP.shown(kept) == kept, kept
    # A registry crate compiled in its own directory: its remapped name back to that directory.
    crate = Roots.of(CWD=Path("/home/me/.cargo/registry/src/index-1/serde-1.0.0"))._replace(
        cwd_remap="/larder/crate/serde-1.0.0"
    )
    assert crate.shown("--> /larder/crate/serde-1.0.0/src/de.rs:9:1") == (
        "--> /home/me/.cargo/registry/src/index-1/serde-1.0.0/src/de.rs:9:1"
    )
    assert LAPTOP.shown("/larder/crate/serde-1.0.0/src/de.rs") == (
        "/larder/crate/serde-1.0.0/src/de.rs"  # another crate's: no directory known here
    )
    # A root JSON would have to escape stays remapped: the JSON must stay whole.
    quoted = Roots.of(TARGET=Path('/tmp/my "target"'), CARGO_HOME=Path("/tmp/back\\slash"))
    text = '"/larder/target/debug/x.rs /larder/cargo-home/x.rs"'
    assert quoted.shown(text) == text


def test_relative_paths_stay_and_shallow_roots_are_ignored() -> None:
    assert CI.portable_path("crates/leaf/src/lib.rs") == "crates/leaf/src/lib.rs"
    shallow = Roots.of(CWD=Path("/"), TARGET=Path("/tmp"), CARGO_HOME=None)
    assert shallow.roots == ()
    assert shallow.portable("/tmp/x") == "/tmp/x"
    assert shallow.remap_flags() == []


def test_top_level_directories_of_a_container_are_roots() -> None:
    """``/app`` and ``/target`` (a Dockerfile's layout) were ignored as too shallow, so every
    compilation there kept absolute paths and missed from anywhere else."""
    container = Roots.of(
        CWD=Path("/app"), TARGET=Path("/target"), CARGO_HOME=Path("/usr/local/cargo")
    )
    laptop = Roots.of(
        CWD=Path("/home/me/app"),
        TARGET=Path("/home/me/app/target"),
        CARGO_HOME=Path("/home/me/.cargo"),
    )
    line = "-L dependency={}/debug/deps {}/src/lib.rs"
    assert container.portable(line.format("/target", "/app")) == laptop.portable(
        line.format("/home/me/app/target", "/home/me/app")
    )
    assert container.portable("/application/x") == "/application/x"  # whole components only
    assert Roots.of(CWD=Path("/usr"), TARGET=Path("/home"), CARGO_HOME=Path("/root")).roots == ()


def test_remap_flags_put_the_most_specific_root_last() -> None:
    flags = CI.remap_flags()
    assert flags == [
        "--remap-path-prefix=/ci/work/app=.",
        "--remap-path-prefix=/home/ci/.cargo=/larder/cargo-home",
        "--remap-path-prefix=/ci/work/app/target=/larder/target",
    ]


TAG = "Signature: 8a477f597d28d172789f06886806bc55\n"
TRIPLE = "x86_64-unknown-linux-gnu"


def test_target_dir_with_target_given_is_above_the_triples_directory(tmp_path: Path) -> None:
    target = tmp_path / "custom-target"
    deps = target / TRIPLE / "release" / "deps"
    deps.mkdir(parents=True)
    # cargo tags both the target directory and the triple's directory.
    (target / "CACHEDIR.TAG").write_text(TAG)
    (target / TRIPLE / "CACHEDIR.TAG").write_text(TAG)
    assert find_target_dir(deps, TRIPLE) == target
    # Host units of the same build (build scripts, proc-macros) get no --target.
    assert find_target_dir(target / "release" / "deps") == target
    script = target / "release" / "build" / "serde-0123456789abcdef"
    assert find_target_dir(script) == target
    # A target spec file names the directory by its stem.
    custom = target / "thumbv7-custom" / "debug" / "deps"
    assert find_target_dir(custom, "/specs/thumbv7-custom.json") == target


def test_target_dir_cargo_did_not_create_is_found_by_layout(tmp_path: Path) -> None:
    """A target directory made beforehand (a CI cache, a volume) has no CACHEDIR.TAG."""
    target = tmp_path / "made-before"
    for out_dir in (
        target / "debug" / "deps",
        target / "debug" / "examples",
        target / "debug" / "build" / "native-b2a3c4d5e6f70819",
        target / "release-lto" / "deps",
    ):
        out_dir.mkdir(parents=True)
        assert find_target_dir(out_dir) == target, out_dir


def test_target_dir_outside_cargos_layout_is_the_tagged_ancestor(tmp_path: Path) -> None:
    target = tmp_path / "t"
    out_dir = target / "custom" / "out"
    out_dir.mkdir(parents=True)
    assert find_target_dir(out_dir) == out_dir
    (target / "CACHEDIR.TAG").write_text(TAG)
    assert find_target_dir(out_dir) == target
    # A directory under build/ without cargo's hash is not a build script's.
    other = tmp_path / "proj" / "build" / "out"
    other.mkdir(parents=True)
    assert find_target_dir(other) == other


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LARDER_STATE_DIR": "/s/larder"}, "/s/larder"),
        ({"LARDER_STATE_DIR": ".larder-state", "XDG_CACHE_HOME": "/c"}, "/c/larder"),
        ({"XDG_CACHE_HOME": "/c"}, "/c/larder"),
        ({"XDG_CACHE_HOME": "cache", "HOME": "/h"}, "/h/.cache/larder"),
        ({"LARDER_STATE_DIR": "s", "XDG_CACHE_HOME": "c", "HOME": "/h"}, "/h/.cache/larder"),
    ],
)
def test_a_relative_state_directory_is_ignored(
    environ: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cargo runs each rustc in its package's directory: a relative state directory would be
    one per package (and another for ``--stats`` in the workspace)."""
    from larder.client import probe

    monkeypatch.setenv("HOME", environ.get("HOME", "/h"))
    monkeypatch.setattr(probe, "_writable", lambda path: True)
    assert probe.state_dir_name(environ) == expected


def test_a_state_directory_that_cannot_be_written_gives_way_to_a_private_one(
    tmp_path: Path,
) -> None:
    """A CI user whose home is read-only had no state directory: nothing was uploaded."""
    from larder.client.probe import state_dir_name

    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    runtime = tmp_path / "run"
    runtime.mkdir()
    environ = {"LARDER_STATE_DIR": str(blocked / "larder"), "XDG_RUNTIME_DIR": str(runtime)}
    private = runtime / "larder"
    assert state_dir_name(environ) == str(private)
    assert private.is_dir() and private.stat().st_mode & 0o777 == 0o700
    # The same whatever TMPDIR says (it differs from one shell to the next).
    assert state_dir_name({**environ, "TMPDIR": str(tmp_path)}) == str(private)
    assert state_dir_name({**environ, "LARDER_STATE_DIR": str(tmp_path / "ok")}) == str(
        tmp_path / "ok"
    )  # one that can be made is used as it is
    last_resort = f"/tmp/larder-{os.geteuid()}"
    private.chmod(0o777)  # others may write it: not used
    assert state_dir_name(environ) in (last_resort, str(blocked / "larder"))
    private.rmdir()
    private.symlink_to(tmp_path)  # a link another user could have put there: not used
    assert state_dir_name(environ) in (last_resort, str(blocked / "larder"))


def test_a_state_directory_another_user_owns_is_not_written(tmp_path: Path) -> None:
    """``sudo`` keeping ``HOME``: root wrote into the user's state directory (through any link
    the user put there) and left files the user could no longer replace."""
    from larder.client.probe import state_dir_name

    theirs = tmp_path / "home" / ".cache" / "larder"
    theirs.mkdir(parents=True)
    os.chown(theirs, os.geteuid() + 1000, -1)  # the tests run as root: any owner can be set
    environ = {"LARDER_STATE_DIR": str(theirs), "XDG_RUNTIME_DIR": str(tmp_path)}
    assert state_dir_name(environ) == str(tmp_path / "larder")
    os.chown(theirs, os.geteuid(), -1)
    assert state_dir_name(environ) == str(theirs)


def test_a_root_reached_through_a_symlink_is_found_in_both_spellings(tmp_path: Path) -> None:
    """A checkout or ``CARGO_HOME`` behind a symlink: cargo names it as given, the working
    directory and rustc's own resolved paths name the real one; both are the root."""
    real = tmp_path / "disk" / "cargo"
    (real / "registry").mkdir(parents=True)
    link = tmp_path / "home" / ".cargo"
    link.parent.mkdir()
    link.symlink_to(real)
    roots = Roots.of(CARGO_HOME=link)
    given = f"{link}/registry/src/x/lib.rs"
    resolved = f"{real}/registry/src/x/lib.rs"
    assert (
        roots.portable(given)
        == roots.portable(resolved)
        == "@LARDER:CARGO_HOME@/registry/src/x/lib.rs"
    )
    assert roots.local("@LARDER:CARGO_HOME@/registry") == f"{link}/registry"  # as given
    assert roots.remap_flags() == sorted(
        [
            f"--remap-path-prefix={link}=/larder/cargo-home",
            f"--remap-path-prefix={real}=/larder/cargo-home",
        ],
        key=len,
    )
    plain = Roots.of(CARGO_HOME=real)
    assert plain.aliases == () and plain.portable(resolved) == roots.portable(resolved)


def test_the_working_directory_as_cargo_names_it(tmp_path: Path) -> None:
    from larder.client.paths import logical_cwd

    real = tmp_path / "data" / "cargo" / "vendor" / "dep-1.0.0"
    real.mkdir(parents=True)
    (tmp_path / "cargo").symlink_to(tmp_path / "data" / "cargo")
    given = tmp_path / "cargo" / "vendor" / "dep-1.0.0"
    resolved = Path(os.path.realpath(given))
    # A registry crate: cargo runs rustc in its package's directory, named as cargo found it.
    assert logical_cwd(resolved, {"CARGO_MANIFEST_DIR": str(given)}) == given
    # A workspace member: the workspace root, one of its manifest directory's parents.
    member = given / "crates" / "leaf"
    member.mkdir(parents=True)
    assert logical_cwd(resolved, {"CARGO_MANIFEST_DIR": str(member)}) == given
    # Elsewhere, or not under cargo: the working directory as the system names it.
    assert logical_cwd(resolved, {"CARGO_MANIFEST_DIR": str(tmp_path / "other")}) == resolved
    assert logical_cwd(resolved, {}) == resolved


def test_a_crate_compiled_in_its_own_directory_keeps_its_name_in_remapped_paths(
    tmp_path: Path,
) -> None:
    """Cargo compiles a registry, git or vendored crate in its own directory and names its
    root file by absolute path: remapped to ``.`` its paths would read ``./src/de.rs``."""
    from larder.client.paths import crate_dir_remap

    for holder in ("cargo/registry/src/index-1", "mirror/registry/src/other-2", "ws/vendor"):
        crate = tmp_path / holder / "serde-1.0.0"
        assert crate_dir_remap(f"{crate}/src/lib.rs", crate) == "/larder/crate/serde-1.0.0"
        roots = Roots.of(CWD=crate, CARGO_HOME=tmp_path / "cargo")._replace(
            cwd_remap="/larder/crate/serde-1.0.0"
        )
        assert roots.remap_flags()[-1] == f"--remap-path-prefix={crate}=/larder/crate/serde-1.0.0"
        assert roots.extended(SYSROOT=tmp_path).cwd_remap == "/larder/crate/serde-1.0.0"
    workspace = tmp_path / "work" / "app"
    assert crate_dir_remap("src/main.rs", workspace) == "."  # a member: named relatively
    assert crate_dir_remap("crates/leaf/src/lib.rs", workspace) == "."
    assert crate_dir_remap("/elsewhere/src/lib.rs", workspace) == "."  # not inside
    assert crate_dir_remap(None, workspace) == "."
    # A path dependency outside the workspace: the user's own code, lints not capped, whose
    # diagnostics name its real files (./src/lib.rs would read as the workspace's own).
    shared = tmp_path / "shared lib"
    assert crate_dir_remap(f"{shared}/src/lib.rs", shared, lints_capped=False) == ""
    unmapped = Roots.of(CWD=shared, CARGO_HOME=tmp_path / "cargo")._replace(cwd_remap="")
    assert not any(flag.startswith(f"--remap-path-prefix={shared}=") for flag in
                   unmapped.remap_flags())  # fmt: skip
    # A name rustc would split the remap at.
    odd = tmp_path / "vendor" / "feat=x"
    assert crate_dir_remap(f"{odd}/src/lib.rs", odd) == "."
    assert Roots.of(CWD=workspace).remap_flags() == [f"--remap-path-prefix={workspace}=."]


def test_the_workspace_is_known_only_from_cargos_default_target_directory(tmp_path: Path) -> None:
    workspace = tmp_path / "app"
    (workspace / "target").mkdir(parents=True)
    registry_crate = tmp_path / "registry" / "itoa-1.0.0"
    registry_crate.mkdir(parents=True)
    assert workspace_dir(workspace / "target", registry_crate) is None  # no Cargo.toml there
    (workspace / "Cargo.toml").write_text("[workspace]\n")
    assert workspace_dir(workspace / "target", registry_crate) == workspace
    assert workspace_dir(workspace / "target", workspace) is None  # a member: that is CWD
    link = tmp_path / "link"
    link.symlink_to(workspace)
    assert workspace_dir(workspace / "target", link) is None  # CWD in another spelling
    assert workspace_dir(tmp_path / "elsewhere", registry_crate) is None  # CARGO_TARGET_DIR
    assert workspace_dir(None, registry_crate) is None
