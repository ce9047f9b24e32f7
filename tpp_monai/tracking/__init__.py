"""What runs record, in two parts.

* :mod:`~tpp_monai.tracking.runs`: :class:`RunTracker`, the handler every bundle workflow holds (TensorBoard, MLflow
  params/tags/artifacts, the run's plots); bundle configs name it ``tpp_monai.tracking.RunTracker``.
* :mod:`~tpp_monai.tracking.experiments`: an experiment's MLflow parent run and its workflow runs as children.
"""

from tpp_monai.tracking.runs import RunTracker

__all__ = ["RunTracker"]
