// Compiles src/answer.c into a static library in OUT_DIR. It is not bundled into the rlib
// (`-bundle`): the final link finds it on the search path, as system libraries are found.
use std::{env, path::Path, process::Command};

fn run(command: &mut Command) {
    let status = command.status().expect("run a C tool");
    assert!(status.success(), "{:?} failed", command);
}

fn main() {
    let out = env::var("OUT_DIR").expect("OUT_DIR");
    let object = Path::new(&out).join("answer.o");
    run(Command::new("cc").args(["-c", "-O2", "-fPIC", "src/answer.c", "-o"]).arg(&object));
    run(Command::new("ar").arg("crsD").arg(Path::new(&out).join("libanswer.a")).arg(&object));
    println!("cargo:rustc-link-search=native={}", out);
    println!("cargo:rustc-link-lib=static:-bundle=answer");
    println!("cargo:rerun-if-changed=src/answer.c");
    println!("cargo:rerun-if-changed=build.rs");
}
