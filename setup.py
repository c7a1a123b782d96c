"""The optional C extension of imkit (the rest of the build is in pyproject.toml).

``imkit._speedups`` frames an open connection's common case in C; without a C compiler
the build goes on without it and imkit runs its Python framing (imkit.core._framing).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("imkit._speedups", ["src/imkit/_speedups.c"], optional=True),
    ],
)
