"""The PyTorch multi-task ranker and its three cadences.

- ``data``: the input spec (from ``schemas/features.py``) and frames encoded into batches;
- ``model``, ``loss``, ``train``: the ranker, its multi-task loss with the label schemes, the training loop;
- ``full_retrain``, ``warm_start``, ``online``: the cadences (``python -m trainers.<cadence>``);
- ``calibration``, ``metrics``, ``scoring``: downsampling undone, post-hoc calibration, the served probabilities;
- ``registry``: versioned models (safetensors + JSON), promote and rollback;
- ``river_baseline``: the streaming yardstick; ``evaluate``: everything judged against the simulator's truth.
"""
