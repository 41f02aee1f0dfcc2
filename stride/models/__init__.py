"""Built-in models; importing this package registers them."""
from stride.models.builtin import CNN, MLP, ResNet

__all__ = ["CNN", "MLP", "ResNet"]
