"""Demo apps for otelprof-middleware: ``python -m demo_app`` (FastAPI) or ``--flask``."""
