"""Prometheus metrics: one registry per app, every label set bounded and created at 0.

Series (``larder_<subsystem>_<name>_<unit>``; counters end in ``_total``):

==========================================  ===============================================
``larder_http_requests_total``              cache, protocol, status_class
``larder_http_request_duration_seconds``    protocol (histogram; time to the response head)
``larder_http_requests_in_flight``          (gauge)
``larder_cache_lookups_total``              cache, protocol, kind, result (hit | miss),
                                            role (reader | writer: the request's token could
                                            write to the cache, as CI's does)
``larder_rustc_miss_reasons_total``         cache, category (why a shim says a crate missed)
``larder_transfer_sent_bytes_total``        cache, protocol (response bodies)
``larder_transfer_received_bytes_total``    cache, protocol (request bodies)
``larder_upload_requests_total``            cache, protocol, outcome (accepted or why not)
``larder_access_refused_total``             cache, protocol, needed (read | write | admin):
                                            401/403 for a missing, bad or too weak token
``larder_storage_objects``                  cache, kind (gauge, from the periodic scan)
``larder_storage_size_bytes``               cache, kind (gauge, stored bytes, same scan)
``larder_backend_operations_total``         backend, operation
``larder_backend_errors_total``             backend, operation
``larder_gc_runs_total``                    result (completed | busy | failed)
``larder_gc_evicted_objects_total``         cache, kind
``larder_gc_freed_bytes_total``             bytes of evicted objects and reaped blobs
``larder_gc_reaped_blobs_total``            blobs nothing referred to any more
``larder_gc_restored_objects_total``        deleted, then put back for a racing upload
``larder_gc_last_completed_timestamp_seconds``  the store's last completed run (``gc/last-run``)
``larder_gc_duration_seconds``              length of this replica's last run (gauge)
``larder_use_flushes_total``                result (ok | failed): recorded uses written
``larder_upload_decoder_memory_bytes``      reserved by uploads' decoders (gauge, all workers)
``larder_upload_decoder_waits_total``       uploads that waited for decoder memory
==========================================  ===============================================

Labels never take a path, key or token: ``cache`` is a cache that exists (``_none`` for requests
naming none), ``protocol`` is one of :data:`PROTOCOLS`, ``kind`` one of :data:`LOOKUP_KINDS` or
:data:`STORED_KINDS`, ``category`` one of :data:`MISS_CATEGORIES`. A new protocol adds its
lookup kinds to :data:`LOOKUP_KINDS` and its route prefix to :data:`ROUTE_PROTOCOLS`, here, and
nothing else.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from larder.core.gc.graph import KINDS
from larder.protocol.inputs import CATEGORIES as MISS_CATEGORIES

# protocol -> what its lookups look up
LOOKUP_KINDS: dict[str, tuple[str, ...]] = {
    "nix": ("narinfo", "nar"),
    "rustc": ("manifest",),
    "sccache": ("entry",),
}
PROTOCOLS = (*LOOKUP_KINDS, "api", "other")
# route pattern prefix -> protocol, most specific first (a route's protocol is its first match)
ROUTE_PROTOCOLS: tuple[tuple[str, str], ...] = (
    ("/{cache}/rustc", "rustc"),
    ("/{cache}/sccache", "sccache"),
    ("/api/", "api"),
    ("/{cache}", "nix"),
)
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
#: A status's class, by ``min(status // 100, 5)``.
STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
SCOPES = ("read", "write", "admin")
#: Who looked up: ``writer`` when the request's token could write to the cache (CI, whose
#: ``nix copy`` asks for every path before pushing it), else ``reader``.
ROLES = ("reader", "writer")
UPLOAD_OUTCOMES = (
    "accepted",
    "bad_format",
    "verification_failed",
    "invalid_input",
    "too_large",
    "unauthorized",
    "forbidden",
    "no_such_cache",
    "storage_full",
    "storage_error",
    "other",
)
STORED_KINDS = tuple(KINDS)
GC_RESULTS = ("completed", "busy", "failed")
#: Every operation :class:`larder.service.observability.instrumented_storage.InstrumentedStorage`
#: counts: one per method of :class:`larder.storage.base.Storage` but ``close``, and ``blob_write``
#: for a writer's commit (``tests/service/test_metrics.py`` checks the two agree).
BACKEND_OPERATIONS = (
    "get",
    "put",
    "put_if_absent",
    "exists",
    "delete",
    "delete_if_older",
    "room_for",
    "note_full",
    "full_since",
    "release_reserve",
    "housekeep",
    "keys",
    "object_infos",
    "list_level",
    "blob_open",
    "blob_stored_size",
    "blob_delete",
    "blob_delete_if_older",
    "blob_ids",
    "blob_infos",
    "blob_write",
    "check",
    "check_writes",
)
NO_CACHE = "_none"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The app's series, on its own registry (``GET /metrics`` renders it).

    In a multi-process server (``multiprocess_dir`` set, and prometheus-client started in its
    multiprocess mode there) :meth:`render` sums every worker's series; the in-flight gauge sums
    the live workers, the storage and collection gauges take the largest value among live
    workers (only one scans; a dead worker's last values go with it, see ``_forget``).
    """

    def __init__(self, backend: str, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "larder_http_requests_total",
            "HTTP requests answered.",
            ["cache", "protocol", "status_class"],
            registry=r,
        )
        self.latency = Histogram(
            "larder_http_request_duration_seconds",
            "Time to the response head.",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "larder_http_requests_in_flight",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.lookups = Counter(
            "larder_cache_lookups_total",
            "Cache lookups by result (hit or miss) and role (reader or writer).",
            ["cache", "protocol", "kind", "result", "role"],
            registry=r,
        )
        self.miss_reasons = Counter(
            "larder_rustc_miss_reasons_total",
            "rustc misses by the category the shim found.",
            ["cache", "category"],
            registry=r,
        )
        self.sent = Counter(
            "larder_transfer_sent_bytes_total",
            "Response body bytes sent (what went out, not what was declared).",
            ["cache", "protocol"],
            registry=r,
        )
        self.received = Counter(
            "larder_transfer_received_bytes_total",
            "Request body bytes.",
            ["cache", "protocol"],
            registry=r,
        )
        self.uploads = Counter(
            "larder_upload_requests_total",
            "Uploads, accepted or refused (outcome says why).",
            ["cache", "protocol", "outcome"],
            registry=r,
        )
        self.refused = Counter(
            "larder_access_refused_total",
            "Requests to a cache refused for their token (none, invalid, or not enough scope).",
            ["cache", "protocol", "needed"],
            registry=r,
        )
        self.objects = Gauge(
            "larder_storage_objects",
            "Stored objects by cache and kind.",
            ["cache", "kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.stored_bytes = Gauge(
            "larder_storage_size_bytes",
            "Stored (compressed) bytes by cache and kind.",
            ["cache", "kind"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.backend_ops = Counter(
            "larder_backend_operations_total",
            "Storage backend calls.",
            ["backend", "operation"],
            registry=r,
        )
        self.backend_errors = Counter(
            "larder_backend_errors_total",
            "Storage backend calls that failed.",
            ["backend", "operation"],
            registry=r,
        )
        self.gc_runs = Counter(
            "larder_gc_runs_total",
            "Garbage collections attempted, by result.",
            ["result"],
            registry=r,
        )
        self.gc_evicted = Counter(
            "larder_gc_evicted_objects_total",
            "Objects garbage collection evicted.",
            ["cache", "kind"],
            registry=r,
        )
        self.gc_freed = Counter(
            "larder_gc_freed_bytes_total",
            "Bytes of evicted objects and reaped blobs.",
            registry=r,
        )
        self.gc_reaped = Counter(
            "larder_gc_reaped_blobs_total", "Blobs nothing referred to, deleted.", registry=r
        )
        self.gc_restored = Counter(
            "larder_gc_restored_objects_total",
            "Objects deleted and put back because an upload during the run referred to them.",
            registry=r,
        )
        self.gc_last = Gauge(
            "larder_gc_last_completed_timestamp_seconds",
            "When the store's last garbage collection completed, as this replica knows it.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.gc_duration = Gauge(
            "larder_gc_duration_seconds",
            "Length of this replica's last collection.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.decoder_memory = Gauge(
            "larder_upload_decoder_memory_bytes",
            "Decoder memory reserved by the uploads being decoded.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.decoder_waits = Counter(
            "larder_upload_decoder_waits_total",
            "Uploads that waited for decoder memory (503 if none came in body_idle_timeout).",
            registry=r,
        )
        self.use_flushes = Counter(
            "larder_use_flushes_total",
            "Writes of recorded uses, by result.",
            ["result"],
            registry=r,
        )
        for result in GC_RESULTS:
            self.gc_runs.labels(result)
        for result in ("ok", "failed"):
            self.use_flushes.labels(result)
        self.backend = backend
        self._caches: set[str] = set()
        # Bound children by label values: ``labels()`` costs more than the increment itself.
        self._bound: dict[tuple[object, ...], Any] = {}
        for operation in BACKEND_OPERATIONS:
            self.backend_ops.labels(backend, operation)
            self.backend_errors.labels(backend, operation)
        for protocol in PROTOCOLS:
            self.latency.labels(protocol)
        self.add_cache(NO_CACHE)

    def add_cache(self, cache: str) -> None:
        """Create every series of ``cache`` at 0 (once)."""
        if cache in self._caches:
            return
        self._caches.add(cache)
        for protocol in PROTOCOLS:
            for status_class in STATUS_CLASSES:
                self.requests.labels(cache, protocol, status_class)
            self.sent.labels(cache, protocol)
            self.received.labels(cache, protocol)
            for outcome in UPLOAD_OUTCOMES:
                self.uploads.labels(cache, protocol, outcome)
            if cache != NO_CACHE:
                for needed in SCOPES:
                    self.refused.labels(cache, protocol, needed)
        for protocol, kinds in LOOKUP_KINDS.items():
            for kind in kinds:
                for result in ("hit", "miss"):
                    for role in ROLES:
                        self.lookups.labels(cache, protocol, kind, result, role)
        if cache != NO_CACHE:
            for category in MISS_CATEGORIES:
                self.miss_reasons.labels(cache, category)
            for kind in STORED_KINDS:
                self.objects.labels(cache, kind)
                self.stored_bytes.labels(cache, kind)
                self.gc_evicted.labels(cache, kind)

    def render(self) -> bytes:
        """The Prometheus text format of every series (of every worker)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered (label values here are bounded sets)."""
        key = (id(metric), *labels)
        found = self._bound.get(key)
        if found is None:
            found = self._bound[key] = metric.labels(*labels)
        return found

    def lookup(
        self,
        cache: str,
        protocol: str,
        kind: str,
        hit: bool,
        count: int = 1,
        *,
        writer: bool = False,
    ) -> None:
        result = "hit" if hit else "miss"
        role = ROLES[writer]
        self.child(self.lookups, cache, protocol, kind, result, role).inc(count)
