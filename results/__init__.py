"""The results store: SQLAlchemy models, Alembic migrations and the store API (the only code that speaks SQL)."""

from .store import (DEFAULT_URL, FINAL, Claim, LeaseLost, MetricRecord, RunSpec, SchemaMissing, Store, StoreError,
                    check_location, check_url, error_reason, mask_url, resolve_url, split_secret)

__all__ = ["DEFAULT_URL", "FINAL", "Claim", "LeaseLost", "MetricRecord", "RunSpec", "SchemaMissing", "Store",
           "StoreError", "check_location", "check_url", "error_reason", "mask_url", "resolve_url", "split_secret"]
