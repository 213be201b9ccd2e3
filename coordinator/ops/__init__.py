"""The operator surface: the admin HTTP API, its fleet views, Prometheus metrics, tables."""
