"""Serving: many models in one process behind a KServe v2 HTTP API (``kiln serve``)."""
