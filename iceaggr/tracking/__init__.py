"""Tracking: MLflow plumbing that survives a server outage, and a local PostgreSQL store.

Knows nothing of models or training: it records what it is given.
"""
