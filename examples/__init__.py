"""Workloads stride has no built-in for, written as a user would: plug-ins outside `stride/`, named by import path
(e.g. `dataset_kwargs.dataset_name=examples.charlm.data:build`) with the repository root on PYTHONPATH."""
