// Writes a table into OUT_DIR (LARDER_DEMO_SQUARES entries, 8 by default); the library includes
// it. The generated code also holds a function nothing calls: its warning names OUT_DIR.
use std::{env, fs, path::Path};

fn main() {
    let out = env::var("OUT_DIR").expect("OUT_DIR");
    let count: u64 = env::var("LARDER_DEMO_SQUARES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(8);
    let squares: Vec<String> = (1..=count).map(|n| (n * n).to_string()).collect();
    let code = format!(
        "pub const SQUARES: [u64; {}] = [{}];\nfn never_called() {{}}\n",
        count,
        squares.join(", ")
    );
    fs::write(Path::new(&out).join("squares.rs"), code).expect("write squares.rs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LARDER_DEMO_SQUARES");
}
