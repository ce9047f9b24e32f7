"""Reports, in two parts.

* One set of evaluated runs (``python -m tpp_monai report``): :mod:`~tpp_monai.report.runs` (the paper's table and
  the plots of the set) and :mod:`~tpp_monai.tracking.plots` (the plots of one run folder, drawn when it ends).
* One experiment folder (``python -m tpp_monai experiment report``): :mod:`~tpp_monai.report.experiment`
  (``write_report``) reads the folder (:mod:`~tpp_monai.report.experiment_folder`), computes the groups and gains
  (:mod:`~tpp_monai.report.gains`), writes ``report.md`` (:mod:`~tpp_monai.report.markdown`) and the plots
  (:mod:`~tpp_monai.report.experiment_plots`).
"""
