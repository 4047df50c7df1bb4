# syntax=docker/dockerfile:1.7
#
# Cutout's production image: Python 3.11, PyTorch for CUDA 12.6, the app, and every weight baked in
# under /models, running as a non-root user. Built by cloudbuild.yaml; runs on Cloud Run with one L4.
#
# Why CUDA 12.6 and not the torch 2.14.1 wheel on PyPI: that wheel is built for CUDA 13, which needs an
# NVIDIA driver >= 580. Cloud Run preinstalls driver 535.x (CUDA 12.2) for L4 GPUs and containers
# cannot change it. CUDA 12.x runtimes run on any driver >= 525.60.13 (minor-version compatibility),
# and 12.6 is the CUDA 12 build PyTorch 2.14 still publishes, so torch and torchvision come from the
# PyTorch cu126 index at the versions requirements.txt pins. Its kernels include sm_86, which runs on
# the L4's sm_89. (tests/iac/test_delivery_files.py keeps these pins equal to requirements.txt.)
#
# No HEALTHCHECK: Cloud Run ignores it and probes the container itself (startup probe on /ready,
# liveness on /health, see terraform/cloud_run.tf).
#checkov:skip=CKV_DOCKER_2:Cloud Run ignores Docker HEALTHCHECK; its startup (/ready) and liveness (/health) probes are in terraform/cloud_run.tf.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# The CUDA 12.6 base (Ubuntu 22.04) both the build and the runtime stage start from.
FROM nvidia/cuda:12.6.3-base-ubuntu22.04 AS cuda

# ---------------------------------------------------------------- Python and the dependencies
FROM cuda AS python-deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.2
ARG TORCH_CUDA=cu126

# ca-certificates for the downloads; the base image's CUDA runtime is not used by torch, whose wheels
# bring their own CUDA 12.6 libraries. Apt versions are not pinned (DL3008): the base image tag fixes
# the Ubuntu release, and exact pins would break as soon as a security update replaces a version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv

# A standalone CPython (python-build-standalone, via uv) in /opt/python and the virtualenv in
# /opt/venv: both are copied as-is into the runtime stage. Bytecode is compiled now, so the first
# import on a cold start does not have to.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
RUN uv python install "${PYTHON_VERSION}" && uv venv --python "${PYTHON_VERSION}" /opt/venv

COPY requirements.txt /tmp/requirements.txt
# torch and torchvision from the CUDA 12.6 index (with the nvidia-*-cu12 and triton builds they
# depend on); everything else exactly as requirements.txt pins it, minus the CUDA 13 wheels that only
# the PyPI torch build needs.
RUN uv pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}" \
 && grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' /tmp/requirements.txt \
        > /tmp/requirements-no-cuda.txt \
 && uv pip install -r /tmp/requirements-no-cuda.txt \
 && python -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda); \
assert torch.version.cuda.replace('.', '') == '${TORCH_CUDA}'.removeprefix('cu'), 'torch is not the ${TORCH_CUDA} build'"

# ---------------------------------------------------------------- weights
# Fetched and converted once, at build, by the code the service loads them with: effects/weights.py
# (scripts/fetch_weights.py is its command line), the model classes in effects/ and the Hub ids in the
# effect registry (effects/__init__.py). With the registry cache in cloudbuild.yaml this stage is rebuilt
# only when the dependencies or effects/ change; a release that only touched the service, docs, tests or
# infrastructure reuses the weights layer.
FROM python-deps AS weights
ENV HF_HOME=/tmp/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONPATH=/src
WORKDIR /src
COPY scripts/fetch_weights.py scripts/
COPY effects/ effects/
# An optional Hugging Face token (gated or rate-limited downloads): `--secret id=hf_token,src=...`.
RUN --mount=type=secret,id=hf_token,required=false \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
    python scripts/fetch_weights.py /models \
 && rm -rf /tmp/huggingface

# ---------------------------------------------------------------- runtime
FROM cuda AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libGL and GLib for opencv-python (imported by transparent-background); pillow-heif's wheel bundles
# libheif. The service's user owns only its home directory: code, venv and weights are root's,
# read-only to it. (Apt versions unpinned as above.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cutout \
 && useradd --system --uid 10001 --gid cutout --home-dir /home/cutout --create-home \
        --shell /usr/sbin/nologin cutout

COPY --from=python-deps /opt/python /opt/python
COPY --from=python-deps /opt/venv /opt/venv
COPY --from=weights /models /models

WORKDIR /app
COPY service/ service/
COPY effects/ effects/
COPY cache/ cache/
RUN /opt/venv/bin/python -m compileall -q service effects cache

# HOST: Cloud Run reaches the container on all interfaces. HF_HUB_OFFLINE: weights are files here,
# never downloads. Caches that may be written at run time point at /tmp (in memory on Cloud Run):
# numba is not warmed because pymatting, its only user, is not imported on the serving path, and the
# torch inductor cache only matters with CUTOUT_COMPILE_MODEL=true, which compiles on first start
# (compiling needs the GPU, which the build does not have).
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    CUTOUT_MODELS_DIR=/models \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
EXPOSE 8080
CMD ["python", "-m", "service"]
