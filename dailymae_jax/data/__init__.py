"""Data: sample dataset, .beton writing, the crop-decode kernel and ffcv loaders."""

from dailymae_jax.data.jpeg_crop import decode_crop

__all__ = ["decode_crop"]
