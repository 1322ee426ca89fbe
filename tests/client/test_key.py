"""Key derivation: where the checkout lives never matters; every real input does."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from larder.client import args, depinfo
from larder.client.key import (
    MAX_SEARCHED_FILES,
    Base,
    KeyUnavailable,
    base_inputs,
    complete,
    compute,
    depinfo_run,
    direct_entry,
    direct_key,
    from_direct_entry,
    module_twin,
    portable_args,
)
from larder.client.paths import Roots
from larder.protocol.rustc import DirectEntry
from tests.client.changes import Changes

RUSTC_VERSION = "rustc 1.95.0 (59807616e 2026-04-14)\nhost: x86_64-unknown-linux-gnu\n"
SYSROOT = [("libstd-abc.rlib", "11" * 32), ("libcore-def.rlib", "22" * 32)]


@dataclass
class Checkout:
    """A fake cargo build of crate `leaf` in some directory."""

    root: Path
    target: Path
    cargo_home: Path

    @property
    def out_dir(self) -> Path:
        return self.target / "debug" / "build" / "leaf-1" / "out"

    def argv(self, *extra: str) -> list[str]:
        deps = self.target / "debug" / "deps"
        return [
            "--crate-name", "leaf", "--edition=2021", "crates/leaf/src/lib.rs",
            "--error-format=json", "--json=diagnostic-rendered-ansi,artifacts",
            "--diagnostic-width=80", "--crate-type", "lib", "--emit=dep-info,metadata,link",
            "-C", "metadata=aa", "-C", "extra-filename=-aa", "--out-dir", str(deps),
            "-L", f"dependency={deps}", "--extern", f"itoa={deps}/libitoa-1.rmeta",
            "--cfg", 'feature="default"', *extra,
        ]  # fmt: skip

    def deps(self) -> depinfo.DepInfo:
        return depinfo.DepInfo(
            files=(
                "crates/leaf/src/lib.rs",
                f"{self.out_dir}/gen.rs",
                f"{self.cargo_home}/registry/src/x/macro.rs",
            ),
            env=(("GREETING", "hello"), ("OUT_DIR", str(self.out_dir))),
        )


def make_checkout(base: Path) -> Checkout:
    checkout = Checkout(base / "src" / "app", base / "elsewhere" / "target", base / "cargo")
    (checkout.root / "crates/leaf/src").mkdir(parents=True)
    (checkout.root / "crates/leaf/src/lib.rs").write_text("pub fn f() -> u32 { 1 }\n")
    checkout.out_dir.mkdir(parents=True)
    (checkout.out_dir / "gen.rs").write_text("pub const N: u32 = 4;\n")
    (checkout.target / "debug" / "deps").mkdir(parents=True)
    (checkout.target / "debug" / "deps" / "libitoa-1.rmeta").write_bytes(b"itoa metadata")
    (checkout.target / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55")
    (checkout.cargo_home / "registry/src/x").mkdir(parents=True)
    (checkout.cargo_home / "registry/src/x/macro.rs").write_text("macro_rules! m { () => {} }")
    return checkout


def key_of(
    checkout: Checkout,
    *extra: str,
    env: dict[str, str | None] | None = None,
    deps: depinfo.DepInfo | None = None,
    rustc_version: str = RUSTC_VERSION,
) -> str:
    roots = Roots.of(CWD=checkout.root, TARGET=checkout.target, CARGO_HOME=checkout.cargo_home)
    environ = {"CARGO_PKG_NAME": "leaf", "CARGO_PKG_VERSION": "0.1.0", "GREETING": "hello"}
    environ["OUT_DIR"] = str(checkout.out_dir)
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    environ["CARGO_MANIFEST_DIR"] = str(checkout.root / "crates/leaf")
    return compute(
        rustc_version=rustc_version,
        sysroot=SYSROOT,
        compilation=args.parse(checkout.argv(*extra)),
        deps=deps or checkout.deps(),
        roots=roots,
        cwd=checkout.root,
        environ=environ,
    ).key()


@pytest.fixture
def ci(tmp_path: Path) -> Checkout:
    return make_checkout(tmp_path / "ci")


@pytest.fixture
def laptop(tmp_path: Path) -> Checkout:
    return make_checkout(tmp_path / "home" / "me" / "deeper")


def test_location_does_not_change_the_key(ci: Checkout, laptop: Checkout) -> None:
    assert ci.root != laptop.root and ci.target != laptop.target
    assert key_of(ci) == key_of(laptop)


def test_portable_args_drop_outputs_and_paths(ci: Checkout) -> None:
    roots = Roots.of(CWD=ci.root, TARGET=ci.target, CARGO_HOME=ci.cargo_home)
    portable = portable_args(args.parse(ci.argv()), roots)
    assert not any(str(ci.root) in a or str(ci.target) in a for a in portable)
    assert "--extern=itoa" in portable
    assert not any(a.startswith(("--out-dir", "--diagnostic-width")) for a in portable)


def test_a_users_remap_over_the_workspace_keys_where_a_crate_sits_below_it() -> None:
    """With ``--remap-path-prefix=$PWD=/build`` a crate vendored inside the workspace writes
    ``/build/vendor/itoa-1.0.1`` where one from the registry writes the shim's
    ``/larder/crate/itoa-1.0.1``: their keys differ. Two checkouts of one layout agree."""

    def key_args(workspace: str, crate_dir: str) -> list[str]:
        argv = ["--crate-name", "itoa", f"{crate_dir}/src/lib.rs", "--crate-type", "lib",
                "--cap-lints", "allow", f"--remap-path-prefix={workspace}=/build"]  # fmt: skip
        roots = Roots.of(
            CWD=Path(crate_dir),
            TARGET=Path(f"{workspace}/target"),
            CARGO_HOME=Path("/home/u/.cargo"),
            WORKSPACE=Path(workspace),
        )._replace(cwd_remap="/larder/crate/itoa-1.0.1")
        return portable_args(args.parse(argv), roots)

    vendored = key_args("/ci/app", "/ci/app/vendor/itoa-1.0.1")
    assert vendored == key_args("/home/me/app", "/home/me/app/vendor/itoa-1.0.1")
    assert "--remap-path-prefix=@LARDER:CWD@=/build/vendor/itoa-1.0.1" in vendored
    registry = key_args("/home/me/app", "/home/u/.cargo/registry/src/x/itoa-1.0.1")
    assert "--remap-path-prefix=@LARDER:CWD@=/larder/crate/itoa-1.0.1" in registry
    assert vendored != registry


def test_a_path_dependency_outside_the_workspace_is_keyed_by_its_directory() -> None:
    """Its directory is not remapped (its diagnostics name its real files), so its outputs name
    it: the key holds it, and a checkout elsewhere never takes those outputs, while members
    (remapped to ``.``) stay keyed without theirs."""

    def key_args(crate_dir: str, cwd_remap: str) -> list[str]:
        argv = ["--crate-name", "shared", f"{crate_dir}/src/lib.rs", "--crate-type", "lib"]
        roots = Roots.of(CWD=Path(crate_dir), TARGET=Path("/ws/target"), CARGO_HOME=None)
        return portable_args(args.parse(argv), roots._replace(cwd_remap=cwd_remap))

    here, there = key_args("/ci/shared", ""), key_args("/home/me/shared", "")
    assert "--larder-crate-dir=/ci/shared" in here and here != there
    assert key_args("/ci/shared", ".") == key_args("/home/me/shared", ".")


def test_a_users_remap_over_the_target_directory_keys_where_it_sits() -> None:
    """``$PWD=/build`` with the target directory inside the checkout writes OUT_DIR paths as
    ``/build/target/...``; with it elsewhere (``CARGO_TARGET_DIR``) the shim's
    ``/larder/target/...`` is written: the keys must differ."""

    def key_args(target: str) -> list[str]:
        argv = ["--crate-name", "app", "src/lib.rs", "--crate-type", "lib",
                "--remap-path-prefix=/w/app=/build"]  # fmt: skip
        roots = Roots.of(CWD=Path("/w/app"), TARGET=Path(target), CARGO_HOME=Path("/h/.cargo"))
        return portable_args(args.parse(argv), roots)

    inside = key_args("/w/app/target")
    assert "--remap-path-prefix=@LARDER:TARGET@=/build/target" in inside
    assert inside != key_args("/tmp/t")
    # From above every root ($HOME=~) the remapped form names this checkout and is refused
    # on upload anyway: no key line, or two checkouts under one home would share nothing.
    argv = ["--crate-name", "itoa", "/h/u/.cargo/registry/src/x/itoa/src/lib.rs",
            "--crate-type", "lib", "--remap-path-prefix=/h/u=~"]  # fmt: skip
    roots = Roots.of(CWD=Path("/h/u/.cargo/registry/src/x/itoa"), TARGET=Path("/h/u/a/target"),
                     CARGO_HOME=Path("/h/u/.cargo"))  # fmt: skip
    assert not [a for a in portable_args(args.parse(argv), roots) if "@LARDER:TARGET@=" in a]


change = Changes[Checkout]()


@change("source file")
def _source(c: Checkout) -> dict[str, object]:
    (c.root / "crates/leaf/src/lib.rs").write_text("pub fn f() -> u32 { 2 }\n")
    return {}


@change("env! variable")
def _env_dep(c: Checkout) -> dict[str, object]:
    return {"env": {"GREETING": "hi"}}


@change("env! variable becomes unset")
def _env_unset(c: Checkout) -> dict[str, object]:
    return {"env": {"GREETING": None}}


@change("another file read")
def _more_sources(c: Checkout) -> dict[str, object]:
    (c.root / "crates/leaf/src/extra.rs").write_text("pub fn e() {}\n")
    return {"deps": depinfo.DepInfo((*c.deps().files, "crates/leaf/src/extra.rs"), c.deps().env)}


@change("feature")
def _feature(c: Checkout) -> dict[str, object]:
    return {"extra": ("--cfg", 'feature="shout"')}


@change("RUSTFLAGS")
def _rustflags(c: Checkout) -> dict[str, object]:
    return {"extra": ("-C", "opt-level=3")}


@change("crate type")
def _crate_type(c: Checkout) -> dict[str, object]:
    return {"extra": ("--crate-type", "staticlib")}


@change("dependency")
def _dependency(c: Checkout) -> dict[str, object]:
    (c.target / "debug/deps/libitoa-1.rmeta").write_bytes(b"itoa metadata, new version")
    return {}


@change("toolchain")
def _toolchain(c: Checkout) -> dict[str, object]:
    return {"rustc_version": RUSTC_VERSION.replace("1.95.0", "1.96.0")}


@change("build script output")
def _out_dir(c: Checkout) -> dict[str, object]:
    (c.out_dir / "extra.txt").write_text("generated later")
    return {}


@change("included generated file")
def _generated(c: Checkout) -> dict[str, object]:
    (c.out_dir / "gen.rs").write_text("pub const N: u32 = 5;\n")
    return {}


@change("registry source")
def _registry(c: Checkout) -> dict[str, object]:
    (c.cargo_home / "registry/src/x/macro.rs").write_text("macro_rules! m { () => {1} }")
    return {}


@change("package version")
def _version(c: Checkout) -> dict[str, object]:
    return {"env": {"CARGO_PKG_VERSION": "0.2.0"}}


@change("RUSTC_BOOTSTRAP")
def _bootstrap(c: Checkout) -> dict[str, object]:
    return {"env": {"RUSTC_BOOTSTRAP": "1"}}


@change("RUSTC_FORCE_RUSTC_VERSION")
def _forced_version(c: Checkout) -> dict[str, object]:
    return {"env": {"RUSTC_FORCE_RUSTC_VERSION": "1.0.0-forced"}}


@pytest.mark.parametrize("name", change.names())
def test_each_input_changes_the_key(name: str, ci: Checkout) -> None:
    before = key_of(ci)
    options = change.by_name[name](ci)
    extra = options.pop("extra", ())
    after = key_of(ci, *extra, **options)  # type: ignore[arg-type]
    assert after != before, name


def test_other_cargo_variables_do_not_change_the_key(ci: Checkout) -> None:
    base = key_of(ci)
    assert key_of(ci, env={"CARGO_PRIMARY_PACKAGE": "1", "CARGO_MAKEFLAGS": "-j8"}) == base
    # A variable the crate does not read (not in its env-deps) does not matter either.
    assert key_of(ci, env={"UNRELATED": "x"}) == base


def test_variables_the_build_script_set_are_keyed(ci: Checkout, laptop: Checkout) -> None:
    """A proc-macro may read them while it expands (no dep-info line names them): every
    ``cargo:rustc-env`` variable is keyed, with path values in portable form."""
    for checkout in (ci, laptop):
        (checkout.out_dir.parent / "output").write_text(
            "cargo:rerun-if-env-changed=SETTING\n"
            "cargo:rustc-env=SETTING=hello=world\n"
            f"cargo::rustc-env=DATA_DIR={checkout.out_dir}/data\n"
            "cargo:rustc-env=CARGO_PKG_NAME=ignored\n"
            "cargo:warning=rustc-env=NOT_A_VARIABLE=1\n"
        )
    env = {"SETTING": "hello=world"}
    base = key_of(ci, env={**env, "DATA_DIR": f"{ci.out_dir}/data"})
    assert key_of(laptop, env={**env, "DATA_DIR": f"{laptop.out_dir}/data"}) == base
    assert key_of(ci, env={"SETTING": "bye", "DATA_DIR": f"{ci.out_dir}/data"}) != base
    assert key_of(ci, env={"SETTING": "hello=world", "DATA_DIR": "/elsewhere"}) != base
    assert key_of(ci, env={"DATA_DIR": f"{ci.out_dir}/data"}) != base  # unset here
    assert key_of(ci, env={**env, "DATA_DIR": f"{ci.out_dir}/data", "NOT_A_VARIABLE": "2"}) == base
    (ci.out_dir.parent / "output").unlink()  # no build script output: nothing more keyed
    assert key_of(ci, env={"SETTING": "bye"}) == key_of(ci, env={"SETTING": "hello"})


def test_a_registry_crate_is_keyed_by_its_directory_name_not_its_registry(
    tmp_path: Path,
) -> None:
    """Its outputs name ``/larder/crate/<directory>``: the key holds that name, and nothing of
    where the registry (a mirror, another index) keeps it."""
    from larder.client.paths import crate_dir_remap

    def registry_key(holder: str, directory: str, cargo_home: str = "cargo") -> str:
        crate = tmp_path / cargo_home / "registry/src" / holder / directory
        (crate / "src").mkdir(parents=True, exist_ok=True)
        (crate / "src/lib.rs").write_text("pub fn f() -> u32 { 1 }\n")
        argv = ["--crate-name", "fnv", "--edition=2015", f"{crate}/src/lib.rs",
                "--crate-type", "lib", "--emit=dep-info,metadata,link", "--cap-lints", "allow",
                "--out-dir", str(tmp_path / "target/debug/deps")]  # fmt: skip
        compilation = args.parse(argv)
        roots = Roots.of(CWD=crate, CARGO_HOME=tmp_path / cargo_home)._replace(
            cwd_remap=crate_dir_remap(compilation.input, crate)
        )
        deps = depinfo.DepInfo(files=(f"{crate}/src/lib.rs",), env=())
        return compute(
            rustc_version=RUSTC_VERSION, sysroot=SYSROOT, compilation=compilation, deps=deps,
            roots=roots, cwd=crate, environ={"CARGO_PKG_NAME": "fnv"},
        ).key()  # fmt: skip

    base = registry_key("index.crates.io-1949cf8c6b5b557f", "fnv-1.0.7")
    assert registry_key("mirror-0123456789abcdef", "fnv-1.0.7") == base
    assert registry_key("index.crates.io-1949cf8c6b5b557f", "fnv-1.0.7", "home/.cargo") == base
    assert registry_key("vendor-source", "fnv") != base  # its outputs name another directory


def _base(c: Checkout) -> tuple[Base, Roots, dict[str, str], args.Compilation]:
    roots = Roots.of(CWD=c.root, TARGET=c.target, CARGO_HOME=c.cargo_home)
    environ = {"CARGO_PKG_NAME": "leaf", "GREETING": "hello", "OUT_DIR": str(c.out_dir)}
    compilation = args.parse(c.argv())
    base = base_inputs(
        rustc_version=RUSTC_VERSION, sysroot=SYSROOT, compilation=compilation, roots=roots,
        cwd=c.root, environ=environ,
    )  # fmt: skip
    return base, roots, environ, compilation


def test_direct_mode_gives_the_full_key_on_another_machine(ci: Checkout, laptop: Checkout) -> None:
    base, roots, environ, compilation = _base(ci)
    full = complete(base, list(ci.deps().files), ["GREETING", "OUT_DIR"], roots, ci.root, environ)
    entry = direct_entry(ci.deps(), roots)
    assert not any(str(ci.root) in p or str(ci.target) in p for p in entry.sources)

    other_base, other_roots, other_env, other_compilation = _base(laptop)
    assert direct_key(base, compilation, roots, ci.root) == direct_key(
        other_base, other_compilation, other_roots, laptop.root
    )
    again = from_direct_entry(other_base, entry, other_roots, laptop.root, other_env)
    assert again.key() == full.key()

    # The laptop's copy of a recorded file differs: same direct key, different full key.
    (laptop.out_dir / "gen.rs").write_text("pub const N: u32 = 99;\n")
    changed = from_direct_entry(other_base, entry, other_roots, laptop.root, other_env)
    assert changed.key() != full.key()
    # The crate root itself changes the direct key.
    (laptop.root / "crates/leaf/src/lib.rs").write_text("pub fn f() -> u32 { 7 }\n")
    assert direct_key(other_base, other_compilation, other_roots, laptop.root) != direct_key(
        base, compilation, roots, ci.root
    )


def test_a_linked_crate_key_covers_its_link(ci: Checkout, laptop: Checkout) -> None:
    base, roots, environ, _ = _base(ci)
    files, env = list(ci.deps().files), ["GREETING"]
    plain = complete(base, files, env, roots, ci.root, environ)
    link = {"line": ["cc", "-lc"], "inputs": [["/usr/lib/libc.so", "33" * 32]]}
    linked = complete(base, files, env, roots, ci.root, environ, link)
    assert b'"link"' not in plain.document()  # documents of other crates are unchanged
    assert linked.key() != plain.key()
    other = {**link, "inputs": [["/usr/lib/libc.so", "44" * 32]]}
    assert complete(base, files, env, roots, ci.root, environ, other).key() != linked.key()

    # The entry carries the link line; the laptop computes the same key from it.
    entry = direct_entry(ci.deps(), roots, ["cc", "-lc"])
    assert entry.link == ["cc", "-lc"] and b'"link"' in entry.to_json()
    assert b'"link"' not in direct_entry(ci.deps(), roots).to_json()
    other_base, other_roots, other_env, _ = _base(laptop)
    again = from_direct_entry(other_base, entry, other_roots, laptop.root, other_env, link)
    full = complete(base, files, ["GREETING", "OUT_DIR"], roots, ci.root, environ, link)
    assert again.key() == full.key()


def test_direct_entry_naming_a_missing_file_is_unusable(ci: Checkout) -> None:
    base, roots, environ, _ = _base(ci)
    entry = DirectEntry(["crates/leaf/src/gone.rs"], [])
    with pytest.raises(KeyUnavailable, match="source file"):
        from_direct_entry(base, entry, roots, ci.root, environ)


@pytest.mark.parametrize(
    "named",
    [
        "/etc/hostname",
        "/dev/zero",
        "@LARDER:CWD@/../../outside.rs",
        "../outside.rs",
        "@LARDER:CARGO_HOME@/credentials.toml",
        "@LARDER:CARGO_HOME@/config.toml",
    ],
)
def test_a_direct_entry_names_only_the_projects_own_files(ci: Checkout, named: str) -> None:
    """The cache says which files to hash; outside the project (or the registry's checkouts)
    the entry is unusable, so a cache cannot make a client read (and confirm guesses about)
    the machine's own files, nor hang it on a device."""
    base, roots, environ, _ = _base(ci)
    (ci.root.parent / "outside.rs").write_text("pub fn f() {}\n")
    (ci.cargo_home / "credentials.toml").write_text('[registry]\ntoken = "secret"\n')
    (ci.cargo_home / "config.toml").write_text("")
    entry = DirectEntry(["crates/leaf/src/lib.rs", named], [])
    with pytest.raises(KeyUnavailable, match="outside the project"):
        from_direct_entry(base, entry, roots, ci.root, environ)


def test_a_directory_whose_name_extends_the_checkouts_is_outside_it(ci: Checkout) -> None:
    """A checkout at /src/ci is not a prefix of /src/ci-secrets: a cache must not make the
    client read files in a sibling directory whose name starts with the checkout's."""
    base, roots, environ, _ = _base(ci)
    sibling = ci.root.parent / (ci.root.name + "-secrets")
    sibling.mkdir()
    (sibling / "key.rs").write_text("secret\n")
    for named in (str(sibling / "key.rs"), f"../{sibling.name}/key.rs"):
        entry = DirectEntry(["crates/leaf/src/lib.rs", named], [])
        with pytest.raises(KeyUnavailable, match="outside the project"):
            from_direct_entry(base, entry, roots, ci.root, environ)


def test_a_direct_entry_may_name_registry_vendor_and_target_files(ci: Checkout) -> None:
    base, roots, environ, _ = _base(ci)
    registry = ci.cargo_home / "registry/src/index/dep-1.0.0/src"
    registry.mkdir(parents=True)
    (registry / "lib.rs").write_text("pub fn g() {}\n")
    vendor = ci.cargo_home / "vendor/dep-2.0.0"
    vendor.mkdir(parents=True)
    (vendor / "build.rs").write_text("fn main() {}\n")
    sources = [
        "crates/leaf/src/lib.rs",
        "@LARDER:CARGO_HOME@/registry/src/index/dep-1.0.0/src/lib.rs",
        "@LARDER:CARGO_HOME@/vendor/dep-2.0.0/build.rs",
        roots.portable_path(str(ci.out_dir / "gen.rs")),
    ]
    assert from_direct_entry(base, DirectEntry(sources, []), roots, ci.root, environ).key()


def test_only_regular_files_are_hashed(ci: Checkout) -> None:
    base, roots, environ, _ = _base(ci)
    fifo = ci.root / "crates/leaf/src/pipe.rs"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    with pytest.raises(KeyUnavailable, match="not a regular file"):
        complete(base, ["crates/leaf/src/pipe.rs"], [], roots, ci.root, environ)


def test_depinfo_run_lists_sources_and_env_with_real_rustc(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "lib.rs").write_text(
        'mod util;\npub const G: Option<&str> = option_env!("LARDER_TEST_UNSET_VAR");\n'
        'pub const D: &str = include_str!("data.txt");\n'
    )
    (src / "util.rs").write_text("pub fn u() {}\n")
    (src / "data.txt").write_text("data")
    out = tmp_path / "out"
    out.mkdir()
    compilation = args.parse(
        ["--crate-name", "t", "--edition=2021", "src/lib.rs", "--crate-type", "lib",
         "--emit=dep-info,metadata,link", "--out-dir", str(out)]
    )  # fmt: skip
    info = depinfo_run("rustc", compilation, tmp_path, out, {"PATH": _path()})
    assert set(info.files) == {"src/lib.rs", "src/util.rs", "src/data.txt"}
    assert ("LARDER_TEST_UNSET_VAR", None) in info.env
    assert list(out.iterdir()) == []  # the scratch dep-info file is gone, nothing else written


def _path() -> str:
    rustc = shutil.which("rustc")
    assert rustc is not None, "rustc must be on PATH"
    return f"{Path(rustc).parent}:/usr/bin:/bin"


def test_depinfo_run_failure_is_reported(tmp_path: Path) -> None:
    (tmp_path / "lib.rs").write_text("this is not rust")
    compilation = args.parse(
        ["--crate-name", "t", "lib.rs", "--crate-type", "lib", "--out-dir", str(tmp_path)]
    )
    with pytest.raises(KeyUnavailable, match="exited"):
        depinfo_run("rustc", compilation, tmp_path, tmp_path, {"PATH": _path()})


@pytest.mark.parametrize(
    ("source", "twin"),
    [
        ("src/amb.rs", "src/amb/mod.rs"),
        ("src/amb/mod.rs", "src/amb.rs"),
        ("/abs/crate/src/a/b.rs", "/abs/crate/src/a/b/mod.rs"),
        ("mod.rs", None),
        ("src/data.txt", None),
    ],
)
def test_module_twins(source: str, twin: str | None) -> None:
    assert module_twin(source) == twin


def test_a_direct_entry_gives_no_key_once_a_module_is_ambiguous(
    ci: Checkout, laptop: Checkout
) -> None:
    """``mod amb;`` with both ``amb.rs`` and ``amb/mod.rs`` is an error (E0761) that only a real
    run reports: the entry recorded when only one existed must not give a key."""
    base, roots, environ, _ = _base(laptop)
    module = laptop.root / "crates/leaf/src/amb.rs"
    module.write_text("pub fn g() {}\n")
    entry = DirectEntry(["crates/leaf/src/lib.rs", "crates/leaf/src/amb.rs"], [])
    from_direct_entry(base, entry, roots, laptop.root, environ)
    (module.parent / "amb").mkdir()
    (module.parent / "amb" / "mod.rs").write_text("pub fn g() {}\n")
    with pytest.raises(KeyUnavailable, match="both exist"):
        from_direct_entry(base, entry, roots, laptop.root, environ)


def test_what_rustc_finds_by_searching_the_projects_directories_is_keyed(
    ci: Checkout, laptop: Checkout, tmp_path: Path
) -> None:
    """A library named only in the source (``#[link(name = "vfoo", kind = "static")]``, bundled
    into the rlib) or a crate named only by ``extern crate`` is found in a ``-L`` directory
    with no argument naming it: its content must be in the key (it was a wrong hit)."""
    system = tmp_path / "system"
    system.mkdir()
    (system / "libsys.a").write_bytes(b"system archive")
    for c in (ci, laptop):
        (c.root / "vendor").mkdir()
        (c.root / "vendor/libvfoo.a").write_bytes(b"!<arch>\nreturns 41")
        (c.root / "prebuilt").mkdir()
        (c.root / "prebuilt/libpre.rlib").write_bytes(b"pre 1001")

    def searching(c: Checkout) -> str:
        return key_of(
            c, "-L", f"native={c.root}/vendor", "-L", f"{c.root}/prebuilt",
            "-L", f"native={system}",
        )  # fmt: skip

    first = searching(ci)
    assert first == searching(laptop)  # portable: the same from another directory
    (system / "libsys.a").write_bytes(b"system archive, updated")
    assert searching(ci) == first  # system directories are left out, like system headers
    (ci.target / "debug/deps/libunrelated-1.rlib").write_bytes(b"not searched: dependency=")
    assert searching(ci) == first
    (ci.root / "vendor/libvfoo.a").write_bytes(b"!<arch>\nreturns 42")
    second = searching(ci)
    assert second != first
    (ci.root / "prebuilt/libpre.rlib").write_bytes(b"pre 1002")
    assert searching(ci) != second
    for number in range(MAX_SEARCHED_FILES + 1):
        (ci.root / f"vendor/lib{number}.a").write_bytes(b"x")
    with pytest.raises(KeyUnavailable, match="search directory"):
        searching(ci)


@pytest.mark.parametrize("way", ["verbatim", "renamed", "renamed without a kind", "symlink"])
def test_a_library_outside_the_project_is_keyed_by_its_content(
    way: str, ci: Checkout, tmp_path: Path
) -> None:
    """A ``+verbatim`` static library by its own file name, a symlink a build script left in
    ``OUT_DIR`` by what it leads to: a system library updated was a wrong hit either way."""
    system = tmp_path / "system"
    system.mkdir()
    file_name = "foo.a" if way == "verbatim" else "libfooimpl.a" if "renamed" in way else "libz.a"
    library = system / file_name
    library.write_bytes(b"version 1")
    extra: tuple[str, ...] = ()
    if way == "verbatim":
        extra = ("-L", f"native={system}", "-l", "static:+verbatim=foo.a")
    elif way.startswith("renamed"):  # `-l static=NAME:RENAME`: libRENAME.a for NAME
        (system / "libfoo.a").write_bytes(b"not the one linked")
        kind = "static=" if way == "renamed" else ""  # none: #[link(kind = "static")] decides
        extra = ("-L", f"native={system}", "-l", f"{kind}foo:fooimpl")
    else:
        (ci.out_dir / "libz.a").symlink_to(library)
    first = key_of(ci, *extra)
    library.write_bytes(b"version 2, a security update")
    assert key_of(ci, *extra) != first
