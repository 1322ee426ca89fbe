"""Pure wire formats of larder: no I/O (except :func:`larder.protocol.nar.dump_path`), no aiohttp.

* :mod:`~larder.protocol.nix32`       Nix's base-32 encoding of digests.
* :mod:`~larder.protocol.hashes`      Nix hash strings (``algo:digest``, SRI, hex, base64).
* :mod:`~larder.protocol.storepath`   ``/nix/store/<hash>-<name>`` paths.
* :mod:`~larder.protocol.narinfo`     ``.narinfo`` documents and their signed fingerprint.
* :mod:`~larder.protocol.signing`     Nix binary-cache ed25519 keys and signatures.
* :mod:`~larder.protocol.nar`         the NAR archive format: streaming validator, writers.
* :mod:`~larder.protocol.compression` the compressions Nix uses for NARs, streaming and bounded.
* :mod:`~larder.protocol.tokens`      larder's access tokens (HS256 JWTs) and scopes.
* :mod:`~larder.protocol.names`       validated cache names and opaque object paths.

Every parser raises :class:`larder.errors.FormatError` with a message saying what is wrong.
"""
