"""The aiohttp routes of each protocol (:mod:`.nix`, :mod:`.rustc`, :mod:`.webdav`, :mod:`.api`)
and what they share: which cache a request names and whether it may act on it
(:mod:`.cache_access`), credentials (:mod:`.credentials`), request bodies in and stored bytes
out (:mod:`.bodies`), and the headers of the Nix answers (:mod:`.nix_headers`).
"""
