"""Baseline attribution methods the benchmarks compare ECIF against.

Every ``*_scores`` function returns one number per training pair, keyed by (shard, key), with the
same orientation as ``ecif_is``: **larger = more harmful** (removing the pair is predicted to lower
the validation loss). Baselines that natively rank helpful-first are negated, never rescaled.
"""
