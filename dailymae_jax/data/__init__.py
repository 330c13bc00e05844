"""Data: sample dataset, .beton writing, the crop-decode kernel and ffcv loaders."""

from dailymae_jax.data.jpeg_crop import add_crop_index, decode_crop

__all__ = ["add_crop_index", "decode_crop"]
