"""Backend selection: ``cupy`` when a CUDA device is usable, ``host`` on request.

``auto`` never falls back to the host backend on its own: a missing GPU is an
error that says why and how to opt in.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field

from .._errors import BackendUnavailableError
from ._base import Backend

__all__ = [
    "BACKEND_ENV_VAR",
    "GLOBAL_OPT_IN",
    "Backend",
    "GpuProblem",
    "case_hint",
    "current_device",
    "gpu_problem",
    "make_backend",
    "resolve_backend_name",
]

BACKEND_ENV_VAR = "CUPYSTREAMS_BACKEND"
_NAMES = ("auto", "cupy", "host")
_OPT_IN = f"pass backend='host' or set {BACKEND_ENV_VAR}=host to use host threads instead"
#: The opt-in for calls that take no ``backend`` (the global pools).
GLOBAL_OPT_IN = (
    f"set {BACKEND_ENV_VAR}=host to use host threads instead (the global pools follow it)"
)
# The CUDA driver's own library: the CUDA runtime reports its absence as an
# "insufficient driver", which misleads on a machine that has no GPU at all.
_DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


@dataclass(frozen=True)
class GpuProblem:
    """Why the cupy backend cannot run here.

    Attributes:
        summary: What is wrong, in plain words, e.g. "no NVIDIA GPU or CUDA
            driver found".
        detail: The evidence behind the summary (the loader's or CuPy's own
            message), or "".
        cause: The exception that revealed the problem, if any.
    """

    summary: str
    detail: str = ""
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.summary} ({self.detail})" if self.detail else self.summary


def case_hint(value: object) -> str:
    """``"; backend names are lower case: did you mean 'host'?"`` for ``"HOST"``, else ``""``."""
    if isinstance(value, str) and value != value.lower() and value.lower() in _NAMES:
        return f"; backend names are lower case: did you mean {value.lower()!r}?"
    return ""


def resolve_backend_name(backend: str) -> str:
    """Validate ``backend`` and apply the environment's choice to ``auto``."""
    if not isinstance(backend, str) or backend not in _NAMES:
        raise ValueError(f"backend={backend!r} is not one of {_NAMES}{case_hint(backend)}")
    if backend != "auto":
        return backend
    chosen = os.environ.get(BACKEND_ENV_VAR, "auto")
    if chosen not in _NAMES:
        raise ValueError(f"{BACKEND_ENV_VAR}={chosen!r} is not one of {_NAMES}{case_hint(chosen)}")
    return chosen


def _driver_problem() -> str | None:
    """Why the CUDA driver library cannot be loaded, or None when it can."""
    try:
        ctypes.CDLL(_DRIVER_LIBRARY)
    except OSError as exc:
        return str(exc) or f"{_DRIVER_LIBRARY} cannot be loaded"
    return None


def _no_device(detail: str, cause: BaseException | None = None) -> GpuProblem:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # with a driver present, the usual reason
        detail = "; ".join(part for part in (detail, f"CUDA_VISIBLE_DEVICES={visible!r}") if part)
    return GpuProblem("no CUDA device is visible", detail, cause)


def _probe_cupy() -> int | GpuProblem:
    """The number of CUDA devices CuPy sees, or why it cannot use any."""
    try:
        import cupy
    except ImportError as exc:
        driver = _driver_problem()
        if driver is not None:
            # CuPy would not help on this machine: say what is really missing.
            return GpuProblem(
                "no NVIDIA GPU or CUDA driver found", f"{driver}; CuPy is not installed either", exc
            )
        return GpuProblem(
            "CuPy is not installed: pip install 'cupystreams[cuda12]' or 'cupystreams[cuda13]'",
            str(exc),
            exc,
        )
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError, or a driver library that fails to load
        driver = _driver_problem()
        if driver is not None:
            return GpuProblem("no NVIDIA GPU or CUDA driver found", f"{driver}; CuPy: {exc}", exc)
        if "cudaErrorNoDevice" in str(exc):
            return _no_device(str(exc), exc)
        return GpuProblem("CuPy cannot use the CUDA driver", str(exc), exc)
    if count == 0:
        return _no_device("")
    return count


def gpu_problem() -> GpuProblem | None:
    """Why the cupy backend cannot run here, or None when a CUDA device is usable."""
    found = _probe_cupy()
    return found if isinstance(found, GpuProblem) else None


def _cupy_device_count(opt_in: str = _OPT_IN) -> int:
    found = _probe_cupy()
    if isinstance(found, GpuProblem):
        raise BackendUnavailableError(f"{found}; {opt_in}") from found.cause
    return found


def _check_device(device: int | None, count: int) -> None:
    if device is None:
        return
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device={device!r} must be an int device ordinal or None")
    if not 0 <= device < count:
        raise ValueError(f"device={device} is out of range [0, {count - 1}]")


def current_device(backend: str = "auto", opt_in: str = _OPT_IN) -> int:
    """The calling thread's current device for ``backend`` (0 on the host backend).

    Args:
        backend: ``"auto"``, ``"cupy"`` or ``"host"``.
        opt_in: How the error raised without a usable GPU tells the caller to
            choose the host backend (``GLOBAL_OPT_IN`` for calls that take no
            ``backend``).
    """
    if resolve_backend_name(backend) == "host":
        return 0
    _cupy_device_count(opt_in)
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
