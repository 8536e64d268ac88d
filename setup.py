"""Builds the fused CPU kernel (src/rmsprop/kernels/cpu.c) at install time.

The kernel is a plain C shared library loaded with ctypes (no Python or torch headers), so the
build only needs a C compiler. If the build fails (no compiler), installation still
succeeds: the package then compiles the kernel on first use into a cache directory, or falls
back to the pure-PyTorch step (see rmsprop.kernels.cpu). Metadata lives in pyproject.toml.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
KERNELS = HERE / "src" / "rmsprop" / "kernels"
LOADER = KERNELS / "cpu.py"


def _constant(name: str) -> tuple[str, ...]:
    """A tuple constant as written in cpu.py (CFLAGS, SOURCES), so the install-time build and
    the loader agree on the build identity (source hash) without importing the package."""
    m = re.search(rf"^{name} = (\(.*?\))\n", LOADER.read_text(), re.M | re.S)
    if not m:
        raise RuntimeError(f"{name} not found in src/rmsprop/kernels/cpu.py")
    return tuple(ast.literal_eval(m.group(1)))


def _cflags() -> tuple[str, ...]:
    return _constant("CFLAGS")


def _source_hash(cflags: tuple[str, ...]) -> str:
    """cpu.source_hash(): the sources in order, then the flags."""
    h = hashlib.sha256()
    for name in _constant("SOURCES"):
        h.update((KERNELS / name).read_bytes())
    h.update(" ".join(cflags).encode())
    return h.hexdigest()[:16]


class BuildKernel(build_ext):
    """Compile with the flags in cpu.py (retrying without -fopenmp-simd); never fail the
    install."""

    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            attempts = [["/O2", "/fp:precise"]]
        else:
            base = [f for f in _cflags() if f not in ("-shared", "-fPIC")]
            attempts = [base, [f for f in base if f != "-fopenmp-simd"]]
        sid = _source_hash(_cflags())
        macros = [("RMS_SOURCE_HASH", f'"{sid}"')]
        for flags in attempts:
            ext.extra_compile_args = flags
            ext.extra_link_args = ["-pthread"] if "-pthread" in flags else []
            ext.define_macros = macros
            try:
                super().build_extension(ext)
                return
            except Exception as e:  # noqa: BLE001 - any failure: try the next, then give up
                print(f"rmsprop: building the CPU kernel with {' '.join(flags)} failed: {e}",
                      file=sys.stderr)
        print("rmsprop: the CPU kernel was not built at install time; it will be compiled on "
              "first use if a C compiler is available.", file=sys.stderr)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return ["PyInit__cpu"]


setup(
    ext_modules=[Extension("rmsprop.kernels._cpu", sources=["src/rmsprop/kernels/cpu.c"],
                           depends=[f"src/rmsprop/kernels/{name}"
                                    for name in _constant("SOURCES")[1:]],
                           optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
