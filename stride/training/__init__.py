"""The training side: Trainer (trainer.py), the loop (loop.py) and its control plane (control.py), tasks and
metrics (task.py, metrics.py), the optimisation recipe (recipe.py), hooks (hooks.py), metric sinks (sinks.py),
data and loaders (data.py), random streams (rng.py) and the check before a run exists (preflight.py)."""
