"""The prefetcher's parts, one job each; the public API is grain_shm.prefetch."""
