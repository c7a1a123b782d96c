"""imkit benchmark suite: a private-chat relay measured against peer WebSocket servers.

Run ``python -m benchmarks.run --help`` from the repository root; see
``benchmarks/README.md`` for what each figure means.
"""
