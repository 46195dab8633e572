"""The connector's scheduler half: it runs in vLLM's engine core, decides per request what to load and
what to save (scheduler.py), asks the store what it holds (lookups.py over the injected store.py
interface), tracks saves until the workers report them (save_ledger.py) and publishes KV events."""
