"""vLLM integration. plugin.py activates Membrain from the environment; connector.py is the class vLLM
loads, which hands each role to its half: scheduler/ (engine core), worker/ (model runners), and
shared/ (what the two exchange). Importing this package does not import vLLM; its modules do, when used.
"""
