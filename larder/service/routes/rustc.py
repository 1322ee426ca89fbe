"""HTTP routes of the rustc artifact API under ``/<cache>/rustc/`` (used by ``larder-rustc``).

==========================================  ==================================================
``POST rustc/missing``                      ``{"blobs": [...]}`` -> ``{"missing": [...]}``; write
``PUT rustc/blobs/<blake3>``                an output file's bytes, or (``Content-Encoding``)
                                            a zstd stream of them, kept as sent, or another
                                            coding; 400 if they hash otherwise
``GET|HEAD rustc/blobs/<blake3>``           its stored zstd stream (``application/zstd``)
``PUT rustc/manifests/<key>``               a manifest (:mod:`larder.protocol.rustc`); 400
                                            naming the blobs this cache does not hold yet
``GET|HEAD rustc/manifests/<key>``          200 with the manifest on a hit, 404 on a miss
``PUT rustc/direct/<direct key>``           record a direct entry (files, variables)
``GET|HEAD rustc/direct/<direct key>``      ``{"entries": [...]}``; 404 when there are none
                                            (with ``X-Larder-Crate``, counted as that crate's
                                            miss and answered ``X-Larder-Counted: miss``)
``PUT rustc/inputs/<key>``                  the key's inputs document
                                            (:mod:`larder.protocol.inputs`); 400 unless this
                                            cache holds the key's manifest
``GET|HEAD rustc/inputs/<key>``             the inputs document (JSON), 404 when there is none
``GET rustc/inputs?package=&crate=&``       ``{"keys": [...]}``: the keys most recently stored
``version=&crate_type=&target=``            for that crate identity, newest first (may be empty)
``POST rustc/explained``                    ``{"crate", "category"}``: the shim explained a
                                            miss (counted by category; read scope)
==========================================  ==================================================

Writes need a ``write`` token for the cache; reads follow its read policy.
"""

from __future__ import annotations

from aiohttp import web

from larder.errors import FormatError
from larder.protocol.inputs import MAX_INPUTS_SIZE, check_identity, nearest_to_json, parse_report
from larder.protocol.rustc import MAX_MANIFEST_SIZE, check_key, parse_blob_query
from larder.protocol.tokens import Scope
from larder.service import state
from larder.service.observability.recording import (
    note_lookup,
    note_miss_reason,
    note_upload,
    writer,
)
from larder.service.routes.bodies import coded_body, read_document, serve_blob
from larder.service.routes.cache_access import cache_for, expect_continue_for, expect_upload
from larder.service.state import HITS

ZSTD_TYPE = "application/zstd"
# Sent by larder-rustc with manifest lookups, so misses can be counted by crate.
CRATE_HEADER = "X-Larder-Crate"
# On a direct lookup's 404 sent with CRATE_HEADER: the miss is counted.
COUNTED_HEADER = "X-Larder-Counted"


def _key(request: web.Request, name: str) -> str:
    return check_key(request.match_info[name])


def _key_or_404(request: web.Request, name: str) -> str:
    """For reads: a malformed key names nothing, so it is a miss."""
    try:
        return _key(request, name)
    except FormatError:
        raise web.HTTPNotFound() from None


async def post_missing(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.WRITE)
    limit = request.app[state.CONFIG].max_document_size
    wanted = parse_blob_query(await read_document(request, limit))
    missing = await request.app[state.RUSTC].missing(settings, wanted)
    return web.json_response({"missing": missing})


async def put_blob(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    blob_id = _key(request, "blob")
    config = request.app[state.CONFIG]
    coding, body = coded_body(request, config.max_upload_size)
    rustc = request.app[state.RUSTC]
    size = await rustc.upload_blob(settings, blob_id, body, coding, config.max_nar_size)
    return web.json_response({"blake3": blob_id, "size": size})


async def get_blob(request: web.Request) -> web.StreamResponse:
    settings = await cache_for(request, Scope.READ)
    blob_id = _key_or_404(request, "blob")
    reader = await request.app[state.RUSTC].open_blob(settings, blob_id)
    if reader is None:
        raise web.HTTPNotFound()
    return await serve_blob(request, reader, {"Content-Type": ZSTD_TYPE})


async def put_manifest(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    key = _key(request, "key")
    document = await read_document(request, MAX_MANIFEST_SIZE)
    manifest = await request.app[state.RUSTC].put_manifest(settings, key, document)
    return web.json_response({"key": key, "outputs": len(manifest.outputs)})


async def get_manifest(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    key = _key_or_404(request, "key")
    document = await request.app[state.RUSTC].get_manifest(settings, key)
    note_lookup(request, "manifest", document is not None)
    if document is None:
        crate = request.headers.get(CRATE_HEADER)
        if crate and not writer(request):
            request.app[HITS].missed_crate(settings.name, crate)
        raise web.HTTPNotFound()
    return web.Response(body=document, content_type="application/json")


async def put_direct(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    key = _key(request, "key")
    document = await read_document(request, MAX_MANIFEST_SIZE)
    entry_id = await request.app[state.RUSTC].put_direct(settings, key, document)
    return web.json_response({"key": key, "entry": entry_id})


async def get_direct(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    key = _key_or_404(request, "key")
    entries = await request.app[state.RUSTC].get_direct(settings, key)
    if not entries:
        crate = request.headers.get(CRATE_HEADER)
        if crate:
            # No entry, so no key to look up: this is the compilation's miss, counted here
            # (the header on the 404 tells the client it needs no manifest lookup to count it).
            note_lookup(request, "manifest", False)
            if not writer(request):
                request.app[HITS].missed_crate(settings.name, crate)
            raise web.HTTPNotFound(headers={COUNTED_HEADER: "miss"})
        raise web.HTTPNotFound()
    body = b'{"entries":[' + b",".join(entry.to_json() for entry in entries) + b"]}"
    return web.Response(body=body, content_type="application/json")


async def put_inputs(request: web.Request) -> web.Response:
    note_upload(request)
    settings = await cache_for(request, Scope.WRITE)
    key = _key(request, "key")
    document = await read_document(request, MAX_INPUTS_SIZE)
    identity = await request.app[state.RUSTC].put_inputs(settings, key, document)
    return web.json_response({"key": key, "crate": identity.crate})


async def get_inputs(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    key = _key_or_404(request, "key")
    document = await request.app[state.RUSTC].get_inputs(settings, key)
    if document is None:
        raise web.HTTPNotFound()
    return web.Response(body=document, content_type="application/json")


async def get_nearest(request: web.Request) -> web.Response:
    settings = await cache_for(request, Scope.READ)
    identity = check_identity(request.query)
    found = await request.app[state.RUSTC].nearest(settings, identity)
    return web.Response(body=nearest_to_json(found), content_type="application/json")


async def post_explained(request: web.Request) -> web.Response:
    """A shim's account of a miss: counted by category (a bounded label) and by crate."""
    settings = await cache_for(request, Scope.READ)
    crate, category = parse_report(await read_document(request, 4096))
    note_miss_reason(request, category)
    if not writer(request):
        request.app[HITS].explained(settings.name, crate, category)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Register the rustc routes (before the Nix catch-all)."""
    router = app.router
    base = "/{cache}/rustc"
    reading = expect_continue_for(Scope.READ)  # explaining a miss is a read; /missing a write
    asking = expect_continue_for(Scope.WRITE)
    router.add_route("POST", base + "/missing", post_missing, expect_handler=asking)
    router.add_route("PUT", base + "/blobs/{blob}", put_blob, expect_handler=expect_upload)
    router.add_get(base + "/blobs/{blob}", get_blob)
    router.add_route("PUT", base + "/manifests/{key}", put_manifest, expect_handler=expect_upload)
    router.add_get(base + "/manifests/{key}", get_manifest)
    router.add_route("PUT", base + "/direct/{key}", put_direct, expect_handler=expect_upload)
    router.add_get(base + "/direct/{key}", get_direct)
    router.add_route("PUT", base + "/inputs/{key}", put_inputs, expect_handler=expect_upload)
    router.add_get(base + "/inputs/{key}", get_inputs)
    router.add_get(base + "/inputs", get_nearest)
    router.add_route("POST", base + "/explained", post_explained, expect_handler=reading)
