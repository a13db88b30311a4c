"""The one extension, grain_shm._shm, and the start-up hook grain_shm.pth;
everything else is in pyproject.toml."""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "grain_shm.pth"  # runs grain_shm.patch_grain() at start-up if GRAIN_SHM_PATCH_GRAIN is set


class build_py_with_pth(build_py):
    """Also put grain_shm.pth at the root of the build, so the wheel installs
    it into site-packages, where the interpreter runs .pth files."""

    def run(self):
        super().run()
        self.copy_file(os.path.join("src", PTH), os.path.join(self.build_lib, PTH),
                       preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


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
    cmdclass={"build_py": build_py_with_pth},
    ext_modules=cythonize(
        [extension],
        language_level=3,
        include_path=["src"],
        compiler_directives={"boundscheck": False, "wraparound": False},
    )
)
