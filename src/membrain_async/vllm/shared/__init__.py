"""What both halves of the connector use: vLLM's per-step metadata (metadata.py), the KV units of a
model (units.py), what identifies stored KV (identity.py) and the connector's stats (stats.py)."""
