"""Example applications built on Overdrive (importable, so the tests can serve them)."""
