"""Framework adapters, one module per framework: ``torch``, ``jax``, ``numba``.

Import the one you need (``from cupystreams.adapters import torch as cst_torch``);
each imports its framework and raises ``ImportError`` naming the extra to install
when the framework is missing. This package itself imports nothing.
"""
