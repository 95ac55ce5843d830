"""fedlit: a Lightning + Fabric simulator for federated prompt learning on CLIP."""

__version__ = "0.1.0"
