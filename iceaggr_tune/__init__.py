"""iceaggr_tune: the Ray Tune / Ray Train / Optuna / MLflow layer over :mod:`iceaggr`.

Entry point: ``python tune/lr_sweep.py`` (see :mod:`iceaggr_tune.sweep`).
"""
