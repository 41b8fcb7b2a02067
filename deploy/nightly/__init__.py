"""Nightly refresh: dated runs, the LATEST pointer, retention (see publish.py)."""
