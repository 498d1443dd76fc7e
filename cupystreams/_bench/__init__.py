"""Measurements behind ``cupystreams bench`` and ``cupystreams demo``.

Each module measures one thing on the backend it is given: the cupy backend
with real kernels and copies, or the host backend with simulated work (so the
commands and their tests run on machines without a GPU).
"""
