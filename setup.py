"""The optional compiled kernels (stylegrad/aesthetic/_fewrows.c); everything else is in pyproject.toml.

Built on x86-64 with GCC or Clang and OpenMP; the kernels inside are compiled for AVX2 + FMA and used only on
CPUs that have them. If this platform or compiler can't build it, the install goes on without it
(``optional=True``) and stylegrad uses torch's products: the same results, slower tuning."""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
    ext_modules.append(Extension("stylegrad.aesthetic._fewrows", ["stylegrad/aesthetic/_fewrows.c"],
                                 depends=["stylegrad/aesthetic/_fewrows_isa.h"],
                                 extra_compile_args=["-O3", "-fopenmp"],
                                 extra_link_args=["-fopenmp"], optional=True))

setup(ext_modules=ext_modules)
