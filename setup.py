"""Builds the C++ CPU kernels (csrc/) as localpers._cpu; everything else is in pyproject.toml."""
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

# Portable x86-64 code (no -march=native: the wheel must run on other CPUs). -ffp-contract=off keeps the
# compiler from fusing a*b+c into an FMA, which would break bit-exactness with the numpy reference.
if sys.platform == "darwin":  # Apple clang: OpenMP comes from libomp (brew install libomp)
    openmp_compile, openmp_link = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
else:
    openmp_compile, openmp_link = ["-fopenmp"], ["-fopenmp"]

setup(
    ext_modules=[
        Pybind11Extension(
            "localpers._cpu",
            ["csrc/quant.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", "-ffp-contract=off", *openmp_compile],
            extra_link_args=openmp_link,
        )
    ],
)
