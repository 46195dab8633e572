"""Test and benchmark helpers that ship with the package (fault proxy, tiny model generator)."""
