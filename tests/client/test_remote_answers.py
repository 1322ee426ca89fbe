"""What the shim's cache client takes from a server's answers: bounded bodies, answers that name
what was stored, and which failures send it offline."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from larder.client.remote import (
    DEFAULT_TIMEOUT,
    MAX_ANSWER,
    MAX_DIRECT_ANSWER,
    Remote,
    RemoteError,
    network_timeout,
)
from tests.client.test_transport import Script

KEY = "ab" * 32


def answer(status: int, body: bytes, reason: str = "X") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return head + body


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Remote]:
    """A :class:`Remote` whose server sends ``request.param`` (raw answers, one connection)."""
    script = Script([request.param])
    remote = Remote(f"http://127.0.0.1:{script.port}/main", "token", 2.0, {})
    yield remote
    remote.close()
    script.close()


def failure(call: object) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        call()  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize("served", [[answer(200, b"{" + b" " * MAX_ANSWER + b"}")]], indirect=True)
def test_an_answer_larger_than_its_kind_is_not_read_whole(served: Remote) -> None:
    error = failure(lambda: served.get_manifest(KEY))
    assert error.kind == "corrupt" and not error.unreachable
    assert served.bytes_down <= MAX_ANSWER + 256 * 1024


MOVED = (
    b"HTTP/1.1 302 Found\r\nLocation: https://cache.example/main/rustc/manifests/x\r\n"
    b"Content-Length: 46\r\n\r\nyou sent Authorization: Bearer s3cr3t-t0ken.x\n"
)


@pytest.mark.parametrize("served", [[MOVED]], indirect=True)
def test_a_redirect_is_not_followed_and_says_where_it_pointed(served: Remote) -> None:
    """An http:// URL behind an ingress redirecting to https:// showed only "HTTP 302 ''";
    an error page echoing the credentials kept them in what ``--stats`` prints."""
    error = failure(lambda: served.get_manifest(KEY))
    assert error.kind == "refused"
    assert "'https://cache.example/main/rustc/manifests/x': not followed" in str(error)
    assert "s3cr3t" not in str(error) and "Bearer <hidden>" in str(error)


@pytest.mark.parametrize(
    "served",
    [[answer(200, b'{"entries":[]' + b" " * MAX_DIRECT_ANSWER + b"}")]],
    indirect=True,
)
def test_direct_entries_are_bounded_too(served: Remote) -> None:
    assert failure(lambda: served.get_direct(KEY)).kind == "corrupt"
    assert served.bytes_down <= MAX_DIRECT_ANSWER + 256 * 1024


@pytest.mark.parametrize(
    "served", [[b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"version": 1']], indirect=True
)
def test_an_answer_cut_short_is_corrupt_not_unreachable(served: Remote) -> None:
    error = failure(lambda: served.get_manifest(KEY))
    assert error.kind == "corrupt" and not error.unreachable


def test_an_error_page_is_read_only_in_part() -> None:
    page = answer(502, b"<html>" + b"x" * (8 << 20) + b"</html>")
    script = Script([[page], [answer(404, b"")]])
    remote = Remote(f"http://127.0.0.1:{script.port}/main", None, 2.0, {})
    try:
        assert failure(lambda: remote.get_manifest(KEY)).kind == "server"
        assert remote.bytes_down <= 1 << 20
        assert remote.get_manifest(KEY) is None  # on a new connection: the first was dropped
    finally:
        remote.close()
        script.close()


@pytest.mark.parametrize(
    "served",
    [
        [answer(200, b"[" * 100_000 + b"]" * 100_000)],
        [answer(200, b'{"missing": [1, 2]}')],
        [answer(200, b'{"missing": ["' + b"cd" * 32 + b'"]}')],
    ],
    indirect=True,
    ids=["nested", "not-ids", "not-asked"],
)
def test_a_missing_blob_answer_that_makes_no_sense_is_corrupt(served: Remote) -> None:
    assert failure(lambda: served.missing([KEY])).kind == "corrupt"


HTML = b"<html><body>Welcome to our proxy</body></html>"


@pytest.mark.parametrize(
    ("served", "kind"),
    [
        ([answer(200, HTML)], "corrupt"),
        ([answer(200, json.dumps({"blake3": "cd" * 32}).encode())], "corrupt"),
        ([answer(204, b"")], "refused"),
        ([answer(201, json.dumps({"blake3": KEY, "size": 3}).encode())], None),
    ],
    indirect=["served"],
    ids=["proxy-page", "other-blob", "no-content", "stored"],
)
def test_an_upload_counts_only_when_the_answer_names_what_was_sent(
    served: Remote, kind: str | None
) -> None:
    upload = lambda: served.put_blob(KEY, b"abc")  # noqa: E731
    if kind is None:
        upload()
        assert served.bytes_up == 3
    else:
        assert failure(upload).kind == kind
        assert served.bytes_up == 0


@pytest.mark.parametrize(
    ("setting", "seconds"),
    [
        ("", DEFAULT_TIMEOUT),
        ("2.5", 2.5),
        ("soon", DEFAULT_TIMEOUT),
        ("inf", DEFAULT_TIMEOUT),
        ("1e400", DEFAULT_TIMEOUT),
        ("nan", DEFAULT_TIMEOUT),
        ("0", DEFAULT_TIMEOUT),
        ("-1", DEFAULT_TIMEOUT),
        ("3600", 3600.0),
        ("3601", DEFAULT_TIMEOUT),
    ],
)
def test_larder_timeout_is_a_positive_number_of_seconds(setting: str, seconds: float) -> None:
    assert network_timeout({"LARDER_TIMEOUT": setting}) == seconds


@pytest.mark.parametrize(
    "url",
    [
        "http://h:8080",
        "http://h:8080/",
        "http://h:8080//",
        "http://h:99999/main",
        "http://h:port/main",
        "ftp://h/main",
        "http:///main",
    ],
)
def test_a_url_that_names_no_cache_is_a_configuration_error(url: str) -> None:
    assert failure(lambda: Remote(url, None, 1.0, {})).kind == "config"


@pytest.mark.parametrize(
    ("url", "server", "base"),
    [
        ("http://h:8080/main", ("http", "h", 8080), "/main/rustc"),
        ("http://h/main/", ("http", "h", None), "/main/rustc"),
        ("https://[::1]:8443/team", ("https", "::1", 8443), "/team/rustc"),
        ("http://u:p@h/x", ("http", "h", None), "/x/rustc"),
        # ${BASE}/main with BASE ending in /: the empty segment is dropped
        ("http://h:8080//main", ("http", "h", 8080), "/main/rustc"),
        ("https://h/larder/main", ("https", "h", None), "/larder/main/rustc"),  # a proxy prefix
    ],
)
def test_a_url_with_a_cache_is_taken(
    url: str, server: tuple[str, str, int | None], base: str
) -> None:
    """What a LARDER_URL names: the server the shim connects to and the path of the cache's
    API there (a wrong one is a 404 for every lookup: a build that never hits)."""
    remote = Remote(url, None, 1.0, {})
    try:
        assert (remote._scheme, remote._host, remote._port) == server
        assert remote._base == base
    finally:
        remote.close()
