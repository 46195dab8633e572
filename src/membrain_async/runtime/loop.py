"""Moved: the executor is `runtime.executor`, the store `cache.store`, the client factory `cache.remote`.
Kept so old imports (`from membrain_async.runtime.loop import MembrainRuntime, make_client`) still work."""


def __getattr__(name: str):
    if name in ("MembrainRuntime", "RuntimeStats"):
        from .. import runtime

        return getattr(runtime, name)
    if name == "make_client":
        from ..cache.remote import make_client

        return make_client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
