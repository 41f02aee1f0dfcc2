"""Built-in datasets; importing this package registers them."""
from stride.datasets.base import DataSplits, split_dataset
from stride.datasets import builtin  # noqa: F401  (registers the built-ins)

__all__ = ["DataSplits", "split_dataset"]
