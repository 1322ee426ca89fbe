//! A function implemented in C, linked from a static library the build script makes.

extern "C" {
    fn larder_native_answer() -> i32;
}

/// What the C library answers.
pub fn answer() -> i32 {
    // SAFETY: a C function without arguments or side effects.
    unsafe { larder_native_answer() }
}
