"""Backend selection: ``cupy`` when a CUDA device is usable, ``host`` on request.

``auto`` never falls back to the host backend on its own: a missing GPU is an
error that says why and how to opt in.
"""

from __future__ import annotations

import os

from .._errors import BackendUnavailableError
from ._base import Backend

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "current_device",
    "make_backend",
    "resolve_backend_name",
]

BACKEND_ENV_VAR = "CUPYSTREAMS_BACKEND"
_NAMES = ("auto", "cupy", "host")
_OPT_IN = f"pass backend='host' or set {BACKEND_ENV_VAR}=host to use host threads instead"


def resolve_backend_name(backend: str) -> str:
    """Validate ``backend`` and apply the environment's choice to ``auto``."""
    if not isinstance(backend, str) or backend not in _NAMES:
        raise ValueError(f"backend={backend!r} is not one of {_NAMES}")
    if backend != "auto":
        return backend
    chosen = os.environ.get(BACKEND_ENV_VAR, "auto")
    if chosen not in _NAMES:
        raise ValueError(f"{BACKEND_ENV_VAR}={chosen!r} is not one of {_NAMES}")
    return chosen


def _cupy_device_count() -> int:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            f"CuPy is not installed ({exc}); install cupystreams[cuda12] or "
            f"cupystreams[cuda13], or {_OPT_IN}"
        ) from exc
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError, or a driver library that fails to load
        raise BackendUnavailableError(
            f"CuPy cannot reach a CUDA driver ({exc}); {_OPT_IN}"
        ) from exc
    if count == 0:
        raise BackendUnavailableError(f"no CUDA device is visible; {_OPT_IN}")
    return count


def _check_device(device: int | None, count: int) -> None:
    if device is None:
        return
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device={device!r} must be an int device ordinal or None")
    if not 0 <= device < count:
        raise ValueError(f"device={device} is out of range [0, {count - 1}]")


def current_device(backend: str = "auto") -> int:
    """The calling thread's current device for ``backend`` (0 on the host backend)."""
    if resolve_backend_name(backend) == "host":
        return 0
    _cupy_device_count()
    import cupy

    return int(cupy.cuda.runtime.getDevice())


def make_backend(backend: str, device: int | None) -> Backend:
    """Build the named backend for ``device`` (None: the current device)."""
    name = resolve_backend_name(backend)
    if name == "host":
        _check_device(device, count=1 << 30)
        from ._host import HostBackend

        return HostBackend(device)
    count = _cupy_device_count()
    _check_device(device, count)
    from ._cupy import CupyBackend

    return CupyBackend(current_device("cupy") if device is None else device)
