"""The connector's worker half: it runs beside each model runner and moves KV pages between vLLM's
cache and the store (worker.py): loads into pages (loads.py), pages to and from host slots (movers.py),
and the layout and header of a stored block (pages.py)."""
