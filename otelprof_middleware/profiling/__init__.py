"""The engine: everything between "a request arrived" and "its profile is stored".

Internal (no public API here; the adapters, the CLI and the tests import from it).
Data flows one way: an adapter describes the request once (``RequestFacts``) and calls
:class:`~._engine.ProfilerCore`; the engine never calls back into the adapter.
docs/how-it-works.md has the map of its modules.
"""
