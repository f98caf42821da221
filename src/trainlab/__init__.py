"""trainlab: a YAML-configured experiment runner for training neural networks."""

__version__ = "0.1.0"
