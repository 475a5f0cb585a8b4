# qscore image. It mirrors the Makefile step for step: `make build` (or `make ort-gpu build`
# for the CUDA variant) fetches ONNX Runtime from PyPI's wheel and builds the release binary;
# the runtime stage carries the binary, the library and the bundled models.
#
#   docker build -t qscore:0.1.0 .                                   # CPU
#   docker build -t qscore:0.1.0-cuda --build-arg VARIANT=cuda .     # CUDA 13 / cuDNN 9; run with --device cuda
#
# No Docker engine runs on the machines this project is developed on, so this file has not
# been built; every command in it is one the Makefile runs and the tests exercise.
ARG VARIANT=cpu
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM rust:1.95-bookworm AS build
ARG VARIANT
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN if [ "$VARIANT" = cuda ]; then make ort-gpu; fi && make build

# For VARIANT=cuda pass a CUDA 13 + cuDNN 9 runtime base, e.g.
# --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
FROM ${RUNTIME_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/qscore /app/qscore
# The binary looks for libonnxruntime.so next to itself.
COPY --from=build /src/.ort/ /app/
COPY --from=build /src/models/ /app/models/
ENV QSCORE_HOST=0.0.0.0 QSCORE_PORT=8080 QSCORE_MODELS_DIR=/app/models
EXPOSE 8080
USER 10001
ENTRYPOINT ["/app/qscore"]
CMD ["serve", "--model", "fmnist-simclr"]
