"""The method's own parts: the Nearby Context Pool's device code (pool.py)."""
