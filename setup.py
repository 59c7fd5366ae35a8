"""The optional compiled connection engine (pointsman/proxy/engine/_engine.pyx) and UDP plane
(_udp.pyx); everything else
about the package is in pyproject.toml.

The extension is optional: without Linux, Cython or a C compiler the build says why and goes on,
and pointsman uses the pure-Python engine. POINTSMAN_NO_EXTENSION=1 skips it on purpose;
POINTSMAN_ENGINE_CFLAGS / POINTSMAN_ENGINE_LDFLAGS replace the flags (scripts/engine_asan.sh
builds with AddressSanitizer that way).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = {"pointsman.proxy.engine._engine": "pointsman/proxy/engine/_engine.pyx",
           "pointsman.proxy.engine._udp": "pointsman/proxy/engine/_udp.pyx",
           # the TCP policy's hot path, compiled (proxy/fold.py)
           "pointsman.proxy._policy": "pointsman/proxy/_policy.pyx"}


def _warn(why: object) -> None:
    print(f"pointsman: compiled engine not built ({why}); the pure-Python engine will be used",
          file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers
            _warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(exc)


def extensions() -> list[Extension]:
    if not sys.platform.startswith("linux"):
        return []
    if os.environ.get("POINTSMAN_NO_EXTENSION"):
        _warn("POINTSMAN_NO_EXTENSION is set")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    cflags = os.environ.get("POINTSMAN_ENGINE_CFLAGS", "-O2").split()
    ldflags = os.environ.get("POINTSMAN_ENGINE_LDFLAGS", "").split()
    exts = [Extension(name, [source], extra_compile_args=cflags, extra_link_args=ldflags)
            for name, source in SOURCES.items()]
    try:
        return list(cythonize(exts, quiet=True, compiler_directives={"language_level": 3}))
    except Exception as exc:  # a Cython error must not fail the install
        _warn(exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
