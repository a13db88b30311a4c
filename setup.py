"""The one extension, grain_shm._shm; everything else is in pyproject.toml."""

import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extension = Extension(
    "grain_shm._shm",
    ["src/grain_shm/_shm.pyx"],
    include_dirs=[numpy.get_include(), "src/grain_shm"],
    define_macros=[
        ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
        # Built against numpy 2 headers, importable on numpy 1.26 too (its C
        # API is 1.25's). Pinned rather than left to numpy's default, which
        # numpy raises as it drops old Pythons.
        ("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION"),
    ],
    # shm_open lives in librt before glibc 2.34 (manylinux_2_28 has 2.28).
    libraries=["rt"] if sys.platform.startswith("linux") else [],
    extra_compile_args=["-O2", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=cythonize(
        [extension],
        language_level=3,
        include_path=["src"],
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
