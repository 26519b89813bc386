"""Models: the networks, their input normalization and their losses.

Above :mod:`iceaggr.data`, of which it uses only the batch format (:mod:`iceaggr.data.batch`).
"""
