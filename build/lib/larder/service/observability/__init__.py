"""What the service counts and writes about requests: the Prometheus registry (:mod:`.metrics`),
the middleware and hooks handlers call (:mod:`.recording`), answers of the front counted in
batches (:mod:`.answer_tally`), the access log (:mod:`.access_log`) and the storage backend
wrapped so every call is counted (:mod:`.instrumented_storage`).
"""
