"""Builds the C++ CPU kernels (csrc/) as localpers._cpu; everything else is in pyproject.toml."""
import hashlib
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

# Portable x86-64 code (no -march=native: the wheel must run on other CPUs). -ffp-contract=off keeps the
# compiler from fusing a*b+c into an FMA, which would break bit-exactness with the numpy reference.
if sys.platform == "darwin":  # Apple clang: OpenMP comes from libomp (brew install libomp)
    openmp_compile, openmp_link = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
else:
    openmp_compile, openmp_link = ["-fopenmp"], ["-fopenmp"]

# The extension records the SHA-256 of the source it was compiled from (localpers._cpu.source_sha256), so that a
# test can tell an extension built from this checkout from a stale or foreign one.
SOURCES = ["csrc/quant.cpp"]
source_sha256 = hashlib.sha256(b"".join((Path(__file__).parent / s).read_bytes() for s in SOURCES)).hexdigest()

setup(
    ext_modules=[
        Pybind11Extension(
            "localpers._cpu",
            SOURCES,
            cxx_std=17,
            define_macros=[("LOCALPERS_SOURCE_SHA256", f'"{source_sha256}"')],
            extra_compile_args=["-O3", "-ffp-contract=off", *openmp_compile],
            extra_link_args=openmp_link,
        )
    ],
)
