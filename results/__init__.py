"""The results store: SQLAlchemy models, Alembic migrations and the store API (the only code that speaks SQL)."""

from .store import (DEFAULT_URL, FINAL, MetricRecord, RunSpec, SchemaMissing, Store, StoreError, check_url,
                    resolve_url)

__all__ = ["DEFAULT_URL", "FINAL", "MetricRecord", "RunSpec", "SchemaMissing", "Store", "StoreError", "check_url", "resolve_url"]
