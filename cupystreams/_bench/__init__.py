"""Measurements behind ``cupystreams bench`` and ``cupystreams demo``.

Each module measures one thing on the backend it is given. On the cupy
backend every figure is measured with real kernels and copies. On the host
backend the pool's own costs (leases, events, threads) are measured on host
threads, and device time is modelled (``model.py``: a GPU's copy engines and
SMs on a virtual clock, with an H100's measured speeds); every modelled figure
is labelled so, and figures that need a GPU are reported as missing.
"""
