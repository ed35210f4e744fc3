"""Integration tests share their helpers with the reliability suite (tests/support.py)."""
