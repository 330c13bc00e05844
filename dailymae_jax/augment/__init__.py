"""On-device augmentation: pixel normalisation and flips, Three Augmentation and colour jitter, Mixup/CutMix.

Everything here runs inside compiled steps on uint8 batches that crossed the host→device link as they were
decoded.
"""

from dailymae_jax.augment.pixels import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize, random_flip

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "normalize", "random_flip"]
