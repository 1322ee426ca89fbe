"""Domain operations over storage and protocol: caches, tokens, Nix uploads and lookups.

Nothing here imports aiohttp or chooses an HTTP status; it raises :mod:`larder.errors`.
"""
