"""The optional compiled kernels (stylegrad/_fewrows.c); everything else is in pyproject.toml.

Built on x86-64 with AVX2, FMA and OpenMP. If this platform or compiler can't build it, the install goes on
without it (``optional=True``) and stylegrad uses torch's products: same results, slower tuning."""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64"):
    if sys.platform == "win32":
        flags, links = ["/O2", "/arch:AVX2", "/openmp"], []
    else:
        flags, links = ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp"]
    ext_modules.append(Extension("stylegrad._fewrows", ["stylegrad/_fewrows.c"], extra_compile_args=flags,
                                 extra_link_args=links, optional=True))

setup(ext_modules=ext_modules)
