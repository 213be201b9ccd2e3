"""Simulation: the trace-driven routing simulator and its comparison and plot, the demo, and
the simulated model servers (``servers/``) that stand in for real ones in tests and the demo.
"""
