"""Keras layers provided by kerasbn."""

from kerasbn.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
