//! Values fixed at compile time from the environment.

/// The package version cargo passed in.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `LARDER_DEMO_GREETING` when the crate was compiled, or a default.
pub fn greeting() -> &'static str {
    option_env!("LARDER_DEMO_GREETING").unwrap_or("hello")
}
