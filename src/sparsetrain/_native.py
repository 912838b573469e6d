"""The native CPU kernels (``_native/sparsetrain_cpu.cpp``), built on first use and cached; optional.

Eager CPU code spends most of a sparse step's extra time in the exact top-K selection of each activation: about
fifteen PyTorch ops and six passes over the tensor. The C++ file does it in two passes over cache-sized chunks on
torch's intra-op threads, bit-identical to the PyTorch path (``tests/test_native.py``). It is compiled with
``torch.utils.cpp_extension`` the first time a process needs it (about a minute, once per machine and torch
version; cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Without a C++ compiler, or
with ``SPARSETRAIN_NATIVE=0``, or when the build fails, everything runs on the PyTorch path (slower, same numbers)
and a warning says why once. Accelerator code never calls it; compiled CPU code calls it only through the opaque
``torch.library`` ops ``sparsetrain::*`` (their bodies run eagerly, outside the traced graph).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

__all__ = ["NATIVE_DTYPES", "native", "native_status", "build_native", "native_disabled"]

_SOURCES = [Path(__file__).parent / "_native" / f for f in ("sparsetrain_cpu.cpp", "allocator.cpp")]
_LOCK = threading.Lock()
NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels take (float64 stays in PyTorch)
_STATE: dict[str, object] = {"tried": False, "module": None, "why": "not built yet"}
_OFF: list[bool] = []  # non-empty inside native_disabled()


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return platform.processor().encode()


def _name(flags: list[str]) -> str:
    # The source, the torch build, the compiler flags and the CPU's instruction sets all go into the name: a cached
    # library built against another torch (headers, ABI), from an older source, or for another CPU (-march=native,
    # e.g. a home directory shared between machines) is never loaded.
    key = b"\0".join([*(p.read_bytes() for p in _SOURCES), torch.__version__.encode(), sys.version.encode(),
                       " ".join(flags).encode(), platform.machine().encode(), _cpu_flags()])
    return f"sparsetrain_cpu_{hashlib.sha256(key).hexdigest()[:12]}"


def _load(flags: list[str], verbose: bool, retry: bool) -> ModuleType:
    from torch.utils import cpp_extension

    name = _name(flags)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    failed = build_dir / "FAILED"
    if failed.exists() and not retry:  # a build that failed is not retried by every new process
        raise RuntimeError(failed.read_text().strip() or "an earlier build failed")
    if not any(build_dir.glob(f"{name}.*")):
        print(f"sparsetrain: compiling the native CPU kernels once (under a minute; cached in {build_dir})",
              file=sys.stderr, flush=True)
    try:
        mod = cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=flags, verbose=verbose)
        failed.unlink(missing_ok=True)
        return mod
    except Exception as e:
        lines = str(e).strip().splitlines()
        failed.write_text(f"{type(e).__name__}: {lines[-1] if lines else ''} (delete this file to retry)\n")
        raise


def _ninja_on_path() -> None:
    # torch's builder runs `ninja`; the `ninja` wheel (a dependency) puts it beside the interpreter, which is not on
    # PATH when a venv's python is run without activating the venv.
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def build_native(verbose: bool = False, retry: bool = False) -> ModuleType | None:
    """Build (or load the cached build of) the native kernels now; None, with the reason in :func:`native_status`,
    when they are unavailable. A failed build is remembered in its build folder; ``retry`` tries again."""
    with _LOCK:
        if _STATE["tried"] and not retry:
            return _STATE["module"]  # type: ignore[return-value]
        _STATE["tried"] = True
        if os.environ.get("SPARSETRAIN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _STATE["why"] = "disabled by SPARSETRAIN_NATIVE=0"
            return None
        _ninja_on_path()
        try:
            try:
                # Tuned for this CPU (vectorised passes); a compiler that rejects the flag gets the portable build.
                mod = _load(["-O3", "-march=native"] if os.name != "nt" else ["/O2"], verbose, retry)
            except Exception:
                if os.name == "nt":
                    raise
                mod = _load(["-O3"], verbose, retry)
        except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch path computes the same numbers
            _STATE["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"sparsetrain: native CPU kernels unavailable ({_STATE['why']}); using the PyTorch path "
                          "(same results, slower). Set SPARSETRAIN_NATIVE=0 to silence this.", RuntimeWarning,
                          stacklevel=2)
            return None
        _STATE["module"], _STATE["why"] = mod, "built"
        return mod


def native() -> ModuleType | None:
    """The kernels if this process may use them (eager, not compiling), building them at first call; else None."""
    if torch.compiler.is_compiling() or _OFF:
        return None  # a compiler cannot trace into it (and Inductor generates its own code)
    if _STATE["tried"]:
        return _STATE["module"]  # type: ignore[return-value]
    return build_native()


def native_status() -> str:
    """``"built"`` or why the native kernels are not used (for bug reports: ``python -c "import sparsetrain._native as n;
    n.build_native(); print(n.native_status())"``)."""
    return str(_STATE["why"])


@contextlib.contextmanager
def native_disabled() -> Iterator[None]:
    """Run the pure-PyTorch path inside the block (tests compare the two; benchmarks time both)."""
    _OFF.append(True)
    try:
        yield
    finally:
        _OFF.pop()
