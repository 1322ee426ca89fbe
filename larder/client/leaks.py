"""What of this machine an output still holds: its root paths, as they may be written in it.

The shim scans each output before uploading it (:meth:`larder.client.shim.Invocation.queue_upload`)
and refuses one that holds any of them (``embeds-paths``): portable keys must not hand out an
output that names another machine's directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from larder.client.paths import remap_join, user_remaps


def fewest_needles(needles: list[bytes]) -> list[bytes]:
    """``needles`` without those under another (a target directory inside the workspace is
    found by the workspace's path): one pass over each output per needle left."""
    unique = set(needles)
    return [
        n for n in unique if not any(n != o and n.startswith(o.rstrip(b"/") + b"/") for o in unique)
    ]


#: Bytes that continue a path component: a root found next to one is part of another path
#: (``/target`` inside ``/larder/target/...`` or ``./src`` or ``/target2``), not the root.
_PATH_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~-")


class Needles(NamedTuple):
    """What to look for in outputs (:func:`scan_needles`)."""

    paths: list[bytes]
    #: Those that are text, not the path, inside an HTML closing tag (``</code>``).
    tag_names: frozenset[bytes] = frozenset()


def embeds(path: Path, needles: Needles) -> bool:
    """Whether the file contains any of ``needles`` (this machine's root paths) as a path of its
    own: not preceded by a path byte or ``/``, not followed by a path byte."""
    import mmap

    if path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for needle in needles.paths:
            at = m.find(needle)
            while at != -1:
                before = m[at - 1] if at else 0
                end = at + len(needle)
                after = m[end] if end < len(m) else 0
                tag = before == ord("<") and after == ord(">") and needle in needles.tag_names
                own = before not in _PATH_BYTES and before != ord("/") and after not in _PATH_BYTES
                if own and not tag:
                    return True
                at = m.find(needle, at + 1)
    return False


def scan_needles(spellings: tuple[tuple[str, str], ...], args: list[str]) -> Needles:
    """What to look for in outputs: this machine's roots (by name and path; the sysroot too,
    which the key names by placeholder), and their remapped form where a remap of the user's own
    over a root's parent (``$HOME=~``) writes the rest of the root's path. ``WORKSPACE`` too
    (an ``env!`` value may name it or a file in it), but a remap from it (``$PWD=/build``) writes
    the same in every checkout whose key names it, so is not looked for. The workspace of a
    crate compiled outside it, found as an HTML closing tag (rustdoc's ``</code>`` in a
    registry crate's docs, with the workspace at ``/code``), is that text, not the path; the
    other roots are looked for in every context."""
    roots = [path for name, path in spellings if name != "WORKSPACE"]
    workspace = [path for name, path in spellings if name == "WORKSPACE"]
    found = roots + remapped(roots, args, also_portable=workspace)
    found += workspace + remapped(workspace, args, also_portable=roots)
    tags = frozenset(path.encode() for path in workspace if path not in roots)
    return Needles(fewest_needles([path.encode() for path in found]), tags)


def remapped(roots: list[str], args: list[str], also_portable: Sequence[str] = ()) -> list[str]:
    """``roots`` as the user's own ``--remap-path-prefix=FROM=TO`` flags write them in outputs
    when ``FROM`` is a directory above them (``$HOME=~``: the rest of the path, this checkout's
    own name, stays in the outputs; the last match wins, as in rustc). A remap from a root or
    from inside one (``$PWD=/build``), or from one of ``also_portable``, writes the same on every
    machine and is left out."""
    values = []
    for index, arg in enumerate(args):
        if arg == "--remap-path-prefix" and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith("--remap-path-prefix="):
            values.append(arg.partition("=")[2])
    remaps = user_remaps(values)
    found = []
    for root in roots:
        for source, target in reversed(remaps):
            if root == source or root.startswith(source + "/"):
                sources = [*roots, *also_portable]
                portable = any(source == r or source.startswith(r + "/") for r in sources)
                if not portable:
                    found.append(remap_join(target, root[len(source) :]))
                break
    return found
