"""Backend-agnostic numerical kernels behind the layer."""
