#!/usr/bin/env bash
# Creates (or completes) the virtual environment that `make demo` and `make test` use. Idempotent: every
# step checks first and does nothing when its part is already there.
#
#   bash tools/setup_env.sh [VENV_DIR] [EXTRAS]      (defaults: .venv and "sample")
#
# 1. OS packages that ffcv 1.0.2 needs to build from source: pkg-config, a C++ compiler, and the OpenCV and
#    libturbojpeg headers (apt-get, as root or through sudo; skipped when pkg-config already finds them).
# 2. A CPU build of torch before anything else: ffcv imports torch everywhere, and letting pip resolve a
#    bare "torch" would pull a multi-GB CUDA build onto a CPU-only machine. Override with TORCH_SPEC.
#    The test extra needs torchvision (timm imports it) and a torch it imports beside: torch 2.14.1 with
#    torchvision 0.29.1 (a larger install).
# 3. The package itself, editable, with the requested extras.
# 4. For the test extra: JAX's CUDA 13 plugin, at the installed jaxlib's version (the two must match, which
#    pyproject cannot say), with its compiler tools (ptxas, libdevice); the tests compile a step for NVIDIA
#    GPUs without having one. Its CUDA libraries are the CUDA 13 ones torch already brought.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-sample}
case ",$extras," in
  *,test,*) torch_spec=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}; torch_check="import torch, torchvision" ;;
  *) torch_spec=${TORCH_SPEC:-torch==2.13.0}; torch_check="import torch" ;;
esac

need_os=()
command -v pkg-config >/dev/null || need_os+=(pkg-config)
command -v g++ >/dev/null || need_os+=(g++)
pkg-config --exists opencv4 2>/dev/null || need_os+=(libopencv-dev)
pkg-config --exists libturbojpeg 2>/dev/null || need_os+=(libturbojpeg0-dev)
pkg-config --exists libjpeg 2>/dev/null || need_os+=(libjpeg-dev)  # dailymae_jax/data/_jpeg_crop.c
if ((${#need_os[@]})); then
  echo "setup: installing OS packages: ${need_os[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_os[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "$torch_check" 2>/dev/null; then
  echo "setup: installing $torch_spec"
  # shellcheck disable=SC2086  # the spec may name several packages
  "${pip[@]}" install $torch_spec
fi
echo "setup: installing dailymae_jax[$extras]"
"${pip[@]}" install -e ".[$extras]"
case ",$extras," in
  *,test,*)
    plugin_check='import importlib.metadata as m, jaxlib, sys
sys.exit(m.version("jax-cuda13-plugin") != jaxlib.__version__ or not all(m.version(d) for d in ("nvidia-cuda-nvcc", "nvidia-nvvm")))'
    if ! "$venv/bin/python" -c "$plugin_check" 2>/dev/null; then
      jaxlib_version=$("$venv/bin/python" -c "import jaxlib; print(jaxlib.__version__)")
      echo "setup: installing jax-cuda13-plugin[with-cuda]==$jaxlib_version"
      "${pip[@]}" install "jax-cuda13-plugin[with-cuda]==$jaxlib_version"
    fi ;;
esac
