"""Garbage collection: what a cache holds as a graph (:mod:`.graph`), which objects to evict in
closure-aware least-recently-used order (:mod:`.plan`, pure), one collection at a time across
replicas (:mod:`.lock`), and the collector that runs them (:mod:`.collector`).
"""
