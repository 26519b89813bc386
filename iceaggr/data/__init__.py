"""Data: the Kaggle layout on disk or in object storage, read into model-ready batches.

The bottom layer: it imports nothing else of :mod:`iceaggr`.
"""
