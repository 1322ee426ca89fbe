"""Store paths from content addresses: vectors are paths real Nix made (``nix path-info --json``
of ``nix-store --add``, ``--add-fixed``, ``builtins.toFile`` with references, and Nix 2.34's
``nix store add --mode git``), then what Nix would refuse to make."""

from __future__ import annotations

import pytest

from larder.errors import FormatError
from larder.protocol.content_address import check_store_path, store_hash_of
from larder.protocol.storepath import StorePath

DIR = "/nix/store/h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d"
SHA1_FILE = "/nix/store/4kn848vczvkyzl9npz1zz3f585s6byn3-f.txt"

# (store path, CA, references) as Nix 2.8 and 2.34 recorded them
MADE_BY_NIX = [
    (DIR, "fixed:r:sha256:16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib", []),
    ("/nix/store/d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
     "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", []),
    (SHA1_FILE, "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", []),
    ("/nix/store/cblyl437j0h6q8c97z4q1w91skrq4gb7-d",
     "fixed:r:sha1:wbv3ss2q8mj6jxdz5aa3r5qwpn7xkdk2", []),
    ("/nix/store/74az1n3l360c9i8bzkwvm6r3ff9wj9n9-f.txt",
     "fixed:sha512:0lrc0dwnvipqviibf7qfm1y492qvjwb1zhkcyi05cndmva1mr5gjcgrnz1x36djmk0sfg8djd2n0"
     "qv68vib2jg590mwznar9jcjphp7", []),
    ("/nix/store/8m3mvkv19z8knmf238xs1wwhhq2i1d4a-withref",
     "text:sha256:19c5z3hnlcnzz8n44mqwdsf74hx0v2pijnfchkq82qb7c6fn27dy", []),
    ("/nix/store/bzjflsj9d6ax5kr3bj97apgmjzm8i91v-withref",
     "text:sha256:1hd6f4ckwr4ym41zyvznyvzflp6hs0n7szp4qznw9bz2ximicfwd", [SHA1_FILE, DIR]),
    ("/nix/store/ljpd5lrfdy93hq5clfrpwph8jg34nv4n-d",
     "fixed:git:sha1:2h522j6imahn8s1ka1ac7g46a69kwnad", []),
    ("/nix/store/vrvdns1lnlacpylxgwyz1wf5j2qppws5-d",
     "fixed:git:sha256:0s9av5x2x60jjkqn4wbdhi7c88p5y133xf4y3x69lwgsn78vsbjg", []),
]  # fmt: skip


@pytest.mark.parametrize(("path", "ca", "refs"), MADE_BY_NIX)
def test_the_store_path_nix_made(path: str, ca: str, refs: list[str]) -> None:
    own = StorePath.parse(path)
    references = [StorePath.parse(r) for r in refs]
    assert store_hash_of(ca, own.name, references, own.hash) == own.hash
    check_store_path(ca, own, reversed(references))  # any order: Nix sorts them
    with pytest.raises(FormatError, match="makes"):
        check_store_path(ca, StorePath(own.hash, own.name + "x"), references)
    if refs:
        with pytest.raises(FormatError, match="makes"):
            check_store_path(ca, own, references[:1])


def test_source_paths_fold_their_references_and_self_into_the_path() -> None:
    ca = "fixed:r:sha256:16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib"
    dep = StorePath.parse(SHA1_FILE)
    alone = store_hash_of(ca, "out", [], "0" * 32)
    with_dep = store_hash_of(ca, "out", [dep], "0" * 32)
    with_self = store_hash_of(ca, "out", [dep, StorePath("0" * 32, "out")], "0" * 32)
    assert len({alone, with_dep, with_self}) == 3


@pytest.mark.parametrize(
    ("ca", "refs", "message"),
    [
        ("text:sha256:19c5z3hnlcnzz8n44mqwdsf74hx0v2pijnfchkq82qb7c6fn27dy", [DIR], "itself"),
        ("fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", [SHA1_FILE],
         "references"),
        ("fixed:r:sha1:wbv3ss2q8mj6jxdz5aa3r5qwpn7xkdk2", [SHA1_FILE], "references"),
        ("fixed:git:md5:" + "1" * 26, [], "git"),
        ("text:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", [], "sha256"),
        ("fixed:r:sha256-" + "A" * 43 + "=", [], "algo"),
        ("fixed:crc32:1234", [], "algo"),
        ("source:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", [], "text"),
        ("fixed:r:sha256:00xy", [], "sha256"),
    ],
)  # fmt: skip
def test_what_nix_would_not_make_is_refused(ca: str, refs: list[str], message: str) -> None:
    own = StorePath.parse(DIR)
    references = [own if r == DIR else StorePath.parse(r) for r in refs]
    with pytest.raises(FormatError, match=message):
        check_store_path(ca, own, references)
