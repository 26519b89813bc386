"""iceaggr: data, model and training for a hierarchical (DOM -> event) IceCube transformer.

The library never imports Ray; the Ray Tune / Ray Train / MLflow layer lives in
``iceaggr_tune`` and calls into it.
"""

__version__ = "0.1.0"
