// Writes a table into OUT_DIR; the library includes it.
use std::{env, fs, path::Path};

fn main() {
    let out = env::var("OUT_DIR").expect("OUT_DIR");
    let squares: Vec<String> = (1..=8u64).map(|n| (n * n).to_string()).collect();
    let code = format!("pub const SQUARES: [u64; 8] = [{}];\n", squares.join(", "));
    fs::write(Path::new(&out).join("squares.rs"), code).expect("write squares.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
