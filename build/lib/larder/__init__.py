"""larder: a remote build cache for Rust teams (Nix binary cache, rustc artifacts, sccache)."""

__version__ = "0.1.0"
