"""HTTP routes of the Nix binary-cache protocol under ``/<cache>/``.

=====================================  ======================================================
``GET|HEAD nix-cache-info``            StoreDir, WantMassQuery, Priority (PUT refused)
``GET|HEAD|PUT <hash>.narinfo``        signed narinfo; PUT verifies against the cache
``GET|HEAD|PUT nar/<hash>.nar[.ext]``  GET serves ``.nar.zst`` (Ranges) and ``.nar``; PUT verifies;
                                       HEAD also finds an upload by its own name (FileHash)
``GET|HEAD|PUT <path>``                anything else Nix uploads (``.ls``, ``log/``, ...), opaque
=====================================  ======================================================

Reads of a missing object are 404 (Nix reads 404 as "not here"); writes need a write token, and
every read of a private cache, ``nix-cache-info`` included, a read token.
Narinfo and opaque uploads may come with a ``Content-Encoding`` (Nix's ``narinfo-compression``,
``ls-compression``, ``log-compression``): larder decodes them and stores them decoded; an opaque
object is served as zstd (its stored form, no work) to a client that accepts zstd, else plain.
"""

from __future__ import annotations

from aiohttp import web

from larder.core.blobs import decompressed
from larder.core.nixcache import (
    MAX_DEBUGINFO,
    FileRecord,
    NixCache,
    nix_cache_info,
    parse_nar_name,
)
from larder.errors import FormatError
from larder.protocol.compression import Decompressor
from larder.protocol.content_coding import accepts
from larder.protocol.names import check_object_path
from larder.protocol.storepath import check_hash_part
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.observability.recording import note_lookup, note_upload, writer
from larder.service.routes.bodies import (
    body_chunks,
    coded_body,
    read_coded_document,
    serve_blob,
    serve_stream,
)
from larder.service.routes.cache_access import cache_for, expect_upload
from larder.service.routes.nix_headers import (
    MISS_HEADERS,
    cache_info_headers,
    nar_headers,
    narinfo_headers,
    opaque_headers,
    opaque_type,
)
from larder.service.state import HITS

# -- nix-cache-info ------------------------------------------------------------------------


async def get_cache_info(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    headers = cache_info_headers(settings.private)
    return web.Response(body=nix_cache_info(settings), headers=headers)


# -- narinfo -------------------------------------------------------------------------------


def _store_hash(request: web.Request) -> str:
    name = request.match_info["name"]
    return check_hash_part(name.removesuffix(".narinfo"))


async def get_narinfo(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    nix = request.app[state.NIX]
    try:
        store_hash = _store_hash(request)
    except FormatError:  # no store path has this hash: not here, as Nix reads a 404
        raise web.HTTPNotFound(headers=MISS_HEADERS) from None
    # HEAD too reads the narinfo: what `nix copy` asks to decide what to upload must agree
    # with what a GET would serve (a stored narinfo that does not parse is missing).
    body = await nix.get_narinfo(settings, store_hash)
    note_lookup(request, "narinfo", body is not None)
    if body is None:
        if not writer(request):  # `nix copy` asks for each path it is about to push
            request.app[HITS].missed_store_hash(settings.name, store_hash)
        raise web.HTTPNotFound(headers=MISS_HEADERS)
    headers = narinfo_headers(settings.private)
    if request.method == "HEAD":
        return web.Response(headers=headers)
    return web.Response(body=body, headers=headers)


async def put_narinfo(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    store_hash = _store_hash(request)
    limit = request.app[state.CONFIG].max_document_size
    coding, document = await read_coded_document(request, limit)
    info = await request.app[state.NIX].put_narinfo(settings, store_hash, document, coding, limit)
    request.app[HITS].uploaded_store_path(settings.name, store_hash, info.store_path.name)
    return web.Response(status=200, text="stored\n")


# -- NARs ----------------------------------------------------------------------------------


async def get_nar(request: web.Request) -> web.StreamResponse:
    settings = await cache_for(request, Scope.READ)
    nix = request.app[state.NIX]
    try:
        nar_hash, compression = parse_nar_name(request.match_info["name"])
    except FormatError:
        raise web.HTTPNotFound() from None
    served = compression in ("zstd", "none")  # larder keeps no file in another compression
    record = await nix.nar_record(settings, nar_hash, serving=True) if served else None
    # What Nix 2.34 asks, by the FileHash of its own compression, before uploading a NAR: the
    # name of an upload this cache stored and whose NAR it still holds. Not counted as a lookup.
    uploaded = record is None and request.method == "HEAD" and compression != "zstd"
    if uploaded and await nix.nar_file(settings, nar_hash, compression) is not None:
        return web.Response(headers=nar_headers(settings.private, larders_own=False))
    larders_own = record is not None and compression == "zstd"  # the narinfo's URL
    if record is None and compression == "zstd":
        # The URL of the narinfo Nix uploaded, which the pushing machine keeps in its narinfo
        # cache and substitutes from later: the NAR that zstd upload stored, as zstd (Nix
        # decodes it and checks NarHash; a NAR uploaded as xz cannot be served as xz), with
        # the same headers for HEAD as for GET.
        record = await nix.nar_file(settings, nar_hash, compression)
    if not served:
        raise web.HTTPNotFound()
    reader = await nix.open_blob(record.blob_id) if record is not None else None
    if request.method != "HEAD":
        # Only downloads are lookups: Nix asks HEAD of a NAR only before uploading it (in
        # its own compression, which larder may not keep), and counting those would make the
        # NAR hit rate depend on how CI compresses its pushes.
        note_lookup(request, "nar", reader is not None)
    if record is None or reader is None:
        raise web.HTTPNotFound()
    if compression == "zstd":
        if reader.stored_size != record.stored_size:
            reader = await nix.checked_blob(record, reader)
            if reader is None:
                raise web.HTTPNotFound()
        return await serve_blob(request, reader, nar_headers(settings.private, larders_own))
    headers = nar_headers(settings.private, larders_own=False)
    if request.method == "HEAD":
        await reader.close()
        return await serve_stream(request, None, record.nar_size, headers)
    return await serve_stream(
        request, decompressed(reader, record.nar_size, record.blob_id), record.nar_size, headers
    )


async def put_nar(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    limit = request.app[state.CONFIG].max_upload_size
    record = await request.app[state.NIX].upload_nar(
        settings, request.match_info["name"], body_chunks(request, limit)
    )
    return web.json_response(
        {"nar_size": record.nar_size, "stored_size": record.stored_size}, status=200
    )


# -- opaque extras ---------------------------------------------------------------------------


async def get_file(request: web.Request) -> web.StreamResponse:
    settings = await cache_for(request, Scope.READ)
    nix = request.app[state.NIX]
    try:
        path = check_object_path(request.match_info["path"])
    except FormatError:
        raise web.HTTPNotFound() from None
    record = await nix.file_record(settings, path)
    if record is None:
        raise web.HTTPNotFound()
    reader = await nix.open_blob(record.blob_id)
    if reader is None:
        raise web.HTTPNotFound()
    headers = {**opaque_headers(record.content_type, settings.private), "Vary": "Accept-Encoding"}
    if path.startswith("debuginfo/") and record.size <= MAX_DEBUGINFO:
        await reader.close()
        document = await nix.debuginfo(settings, record)
        if document is None:
            raise web.HTTPNotFound()
        headers = opaque_headers(record.content_type, settings.private)
        return web.Response(body=document, headers=headers)
    if record.content_encoding in LEGACY_RAW_CODINGS:
        # Stored (before larder decoded uploads) as sent: undo the coding while serving.
        await reader.close()
        return await _serve_legacy_coded(request, nix, record, headers)
    # Sent as stored when its size is what the upload stored (else damaged, or a record from
    # before larder kept that size): decoded and hashed otherwise.
    stored_as_recorded = reader.stored_size == record.stored_size
    if stored_as_recorded and accepts(request.headers.get("Accept-Encoding"), "zstd"):
        return await serve_blob(request, reader, {**headers, "Content-Encoding": "zstd"})
    if request.method == "HEAD":
        await reader.close()
        return await serve_stream(request, None, record.size, headers)
    return await serve_stream(
        request, decompressed(reader, record.size, record.blob_id), record.size, headers
    )


#: Codings aiohttp did not undo for routes before larder decoded uploads itself: objects stored
#: with these are the coded bytes. (gzip and deflate bodies were stored decoded.)
LEGACY_RAW_CODINGS = frozenset({"xz", "bzip2"})


async def _serve_legacy_coded(
    request: web.Request, nix: NixCache, record: FileRecord, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    reader = await nix.open_blob(record.blob_id)
    if reader is None:
        raise web.HTTPNotFound()
    pieces: list[bytes] = []
    decoder = Decompressor(record.content_encoding, pieces.append)
    await response.prepare(request)
    try:
        async for chunk in decompressed(reader, record.size, record.blob_id):
            decoder.write(chunk)
            for piece in pieces:
                await response.write(piece)
            pieces.clear()
        decoder.finish()
        for piece in pieces:
            await response.write(piece)
    except BaseException:
        if request.transport is not None:
            request.transport.close()  # a body cut short, never a wrong one
        raise
    finally:
        decoder.close()
    await response.write_eof()
    return response


async def put_file(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    path = check_object_path(request.match_info["path"])
    config = request.app[state.CONFIG]
    coding, body = coded_body(request, config.max_upload_size)
    await request.app[state.NIX].put_file(
        settings,
        path,
        body,
        content_type=opaque_type(request.headers.get("Content-Type", "")),
        coding=coding,
        limit=config.max_nar_size if coding != "none" else None,
    )
    return web.Response(status=200, text="stored\n")


def add_routes(app: web.Application) -> None:
    """Register the Nix routes; specific patterns first, the opaque catch-all last."""
    router = app.router
    base = "/{cache}"
    for method, pattern, handler in (
        ("GET", "/nix-cache-info", get_cache_info),
        ("GET", r"/{name:[^/]+\.narinfo}", get_narinfo),
        ("PUT", r"/{name:[^/]+\.narinfo}", put_narinfo),
        ("GET", "/nar/{name}", get_nar),
        ("PUT", "/nar/{name}", put_nar),
        ("GET", "/{path:.+}", get_file),
        ("PUT", "/{path:.+}", put_file),
    ):
        if method == "PUT":
            router.add_route("PUT", base + pattern, handler, expect_handler=expect_upload)
        else:
            router.add_get(base + pattern, handler)  # answers HEAD too
