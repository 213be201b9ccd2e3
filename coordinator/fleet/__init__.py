"""The fleet's shared state in Redis: the registry of heartbeats, in-flight claims, model-load
leases, recent decisions and counters, and the Lua scripts (``lua/``) that change them
atomically. Key names: :mod:`coordinator.core.keys`.
"""
