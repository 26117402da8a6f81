"""Plain helpers the tests import: clusters of real processes, an in-process cluster, the origin
types, metrics parsing and a lying peer. Fixtures live in tests/conftest.py, not here."""
