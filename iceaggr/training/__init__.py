"""Training: the configuration, the trainer and what it reports (hooks, MLflow, collapse), and
the stability-table protocol built on it. Imports :mod:`iceaggr.models`, :mod:`iceaggr.data`
and :mod:`iceaggr.tracking`; never Ray.
"""
