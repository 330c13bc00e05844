"""Builds the one C extension; all other metadata lives in pyproject.toml.

``dailymae_jax/data/_jpeg_crop.c`` (with ``_jpeg_index.c``) links against the system libjpeg (libjpeg-turbo 2.1+: it needs
jpeg_crop_scanline and jpeg_skip_scanlines); tools/setup_env.sh installs its headers. It is loaded through ctypes
(dailymae_jax/data/jpeg_crop.py), so it uses no Python C API beyond an empty module stub.
"""

import shlex
import subprocess

from setuptools import Extension, setup


def _pkg_config(flag: str, default: list[str]) -> list[str]:
    """pkg-config's answer for libjpeg, or ``default`` where pkg-config or its .pc file is missing."""
    try:
        out = subprocess.run(["pkg-config", flag, "libjpeg"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return default
    return shlex.split(out)


setup(
    ext_modules=[
        Extension(
            "dailymae_jax.data._jpeg_crop",
            sources=["dailymae_jax/data/_jpeg_crop.c", "dailymae_jax/data/_jpeg_index.c"],
            depends=["dailymae_jax/data/_jpeg_index.h"],
            # -fno-wrapv undoes the -fwrapv in Python's own CFLAGS, which makes the kernel about 10% slower (it keeps
            # GCC from optimising the decoder's and resampler's loops). The C code does not rely on signed overflow
            # wrapping.
            extra_compile_args=["-O3", "-fno-wrapv", "-std=gnu11", *_pkg_config("--cflags", [])],
            extra_link_args=_pkg_config("--libs", ["-ljpeg"]) + ["-lpthread", "-lm"],
        )
    ]
)
