"""Membrain: share vLLM prefix-cache (KV) blocks across a fleet.

Importing this package is cheap: vLLM, torch and the I/O thread are only touched by the modules that need them.
"""

__version__ = "0.1.0"
