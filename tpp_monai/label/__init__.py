"""MONAI Label app serving the project's bundles (``monailabel start_server --app tpp_monai/label ...``).

MONAI Label 0.8.5 runs in its own environment (``python -m tpp_monai.label.environment``); only ``main.py``,
``infer_task.py`` and ``train_task.py`` import ``monailabel``, so this package and its other modules import in the
main environment too.
The server puts this folder on ``PYTHONPATH`` and creates ``model/``, ``lib/``, ``logs/`` and ``bin/`` in it.
"""
