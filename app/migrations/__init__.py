"""Alembic migrations of the service's database; `app.db.upgrade` runs them at start-up.

A package so that a regular (non-editable) install ships `env.py` and `versions/`.
"""
