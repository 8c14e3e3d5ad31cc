"""The evaluation toolchain: does an attribution mean anything?

- ``lds``: Linear Datamodeling Score maths (vectorised Spearman, bootstrap) and file formats.
- ``retrain``: `das lds train`, one retrained model per random subset (resumable).
- ``truth``: `das lds truth`, the retrained models' outputs on the queries.
- ``sweep``: `das lds eval`, LDS of stored scores or of every score variant over a damping grid.
- ``counterfactual``: remove top proponents, retrain, regenerate, compare with random removal.
- ``baselines``: pixel-space similarity and random scores.
- ``cli``: the `das lds ...` and `das counterfactual` commands.
It reads the store and the formulas of the core (``linalg``, ``scoring``); the core never
imports it.
"""
