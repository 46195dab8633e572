"""vLLM integration: the plugin (env activation), the connector's scheduler and worker halves, page
transfer and stats. Importing this package does not import vLLM; its modules do, when used.
"""
