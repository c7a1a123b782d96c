"""Peer servers for the relay benchmark, each run as its own process.

Each module is runnable (``python -m benchmarks.peers.<name>``, see ``_common``) and
importable by the harness without its server library: servers import their library
inside ``serve``, so the harness can load a peer's client-side codec on its own.
"""
