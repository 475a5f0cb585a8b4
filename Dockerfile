# qscore, CPU image. It mirrors the Makefile step for step: `make build` fetches ONNX Runtime
# from PyPI's wheel and builds the release binary; the runtime stage carries the binary, the
# library and the bundled models.
#
# No Docker engine runs on the machines this project is developed on, so this file has not
# been built; every command in it is one the Makefile runs and the tests exercise.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make build

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/qscore /app/qscore
# The binary looks for libonnxruntime.so next to itself.
COPY --from=build /src/.ort/ /app/
COPY --from=build /src/models/ /app/models/
ENV QSCORE_HOST=0.0.0.0 QSCORE_PORT=8080 QSCORE_MODELS_DIR=/app/models
EXPOSE 8080
USER 65534
ENTRYPOINT ["/app/qscore"]
CMD ["serve"]
