"""The teacher subsystem: fitting a small teacher, the cache of its outputs and its writer."""
