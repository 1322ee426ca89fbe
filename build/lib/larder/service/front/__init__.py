"""The connection front: every connection of ``larder serve`` starts here.

What Nix asks most (narinfo, NAR and ``nix-cache-info`` GETs) is answered before aiohttp
(:mod:`.short_path`), request heads are read by llhttp with aiohttp's own checks
(:mod:`.heads`), and slow or too many clients are bounded (:mod:`.limits`); everything else is
handed to the aiohttp application with the bytes already received (:mod:`.connection`).
"""
