"""What ``cupystreams info`` reports: device, limits, versions, usable adapters."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os

from .. import __version__
from .._backends import gpu_problem, make_backend

__all__ = ["collect_info", "device_name"]

_ADAPTERS = (("torch", "torch"), ("jax", "jax"), ("numba", "numba-cuda"))


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: int) -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def _adapter(name: str, distribution: str) -> str:
    version = _version(distribution)
    if version is None and importlib.util.find_spec(name) is None:
        return f"no: {distribution} is not installed"
    try:
        importlib.import_module(f"cupystreams.adapters.{name}")
    except Exception as exc:  # an adapter that cannot import is reported, not fatal
        return f"no: importing cupystreams.adapters.{name} failed ({exc})"
    return f"yes ({distribution} {version})" if version else "yes"


def collect_info(backend: str) -> list[tuple[str, str]]:
    """(field, value) rows for the chosen backend ("cupy" or "host")."""
    rows = [("cupystreams", __version__), ("backend", backend)]
    queues = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if backend == "cupy":
        import cupy

        device_backend = make_backend("cupy", None)
        device = device_backend.device
        properties = cupy.cuda.runtime.getDeviceProperties(device)
        least, greatest = device_backend.priority_range()
        rows += [
            ("device", f"{device}: {device_name(device)}"),
            ("compute capability", f"{properties['major']}.{properties['minor']}"),
            ("SMs", str(properties["multiProcessorCount"])),
            ("memory", f"{properties['totalGlobalMem'] / 2**30:.1f} GiB"),
            ("stream priorities", f"least {least}, greatest {greatest} (lower is more urgent)"),
            (
                "hardware work queues",
                f"{device_backend.hardware_queues()} (CUDA_DEVICE_MAX_CONNECTIONS="
                f"{queues if queues is not None else 'unset, CUDA default 8'})",
            ),
            ("CuPy", cupy.__version__),
            ("CUDA runtime", _cuda_version(cupy.cuda.runtime.runtimeGetVersion())),
            ("CUDA driver", _cuda_version(cupy.cuda.runtime.driverGetVersion())),
        ]
    else:
        host = make_backend("host", None)
        least, greatest = host.priority_range()
        # Why there is no GPU, in full, and no advice to use the host backend:
        # this already is it.
        problem = gpu_problem()
        gpu = "present (--backend cupy uses it)" if problem is None else f"none usable: {problem}"
        rows += [
            ("GPU", gpu),
            ("stream priorities", f"least {least}, greatest {greatest} (simulated)"),
            ("hardware work queues", "unbounded (host threads)"),
            ("CuPy", _version("cupy-cuda12x") or _version("cupy-cuda13x") or "not installed"),
        ]
    for name, distribution in _ADAPTERS:
        rows.append((f"adapter {name}", _adapter(name, distribution)))
    nvtx = _version("nvtx")
    rows.append(
        ("NVTX ranges in traces", f"yes (nvtx {nvtx})" if nvtx else "no (pip install nvtx)")
    )
    return rows
