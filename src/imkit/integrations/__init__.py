"""Optional integrations: Redis discovery and the PostgreSQL store.

Never imported by ``imkit`` itself; each module raises an ImportError naming its extra
when its driver is missing.
"""
