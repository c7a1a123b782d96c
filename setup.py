"""The optional C extensions of imkit (the rest of the build is in pyproject.toml).

``imkit._speedups`` frames an open connection's common case in C; without a C compiler
the build goes on without it and imkit runs its Python framing (imkit.core._framing).

``imkit._sqlite_wal`` is the SQLite VFS that writes a write-ahead-log commit in one
system call (imkit.chat.sqlite uses it with ``synchronous="FULL"``). It needs SQLite's
header (Debian: ``libsqlite3-dev``) but links no SQLite: it finds the one Python's
sqlite3 module runs on at run time. Without the header it is left out, and the store
writes through SQLite's default VFS.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("imkit._speedups", ["src/imkit/_speedups.c"], optional=True),
        Extension(
            "imkit._sqlite_wal",
            ["src/imkit/_sqlite_wal.c"],
            libraries=["dl"] if sys.platform.startswith("linux") else [],
            optional=True,
        ),
    ],
)
