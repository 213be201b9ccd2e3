"""The core: what every layer shares and nothing in it does I/O.

Errors, the Redis key and queue names (``keys``), the heartbeat model and its parser, the
settings read from the environment, and the catalog of routed tasks.
"""
