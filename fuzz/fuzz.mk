# Coverage-guided fuzzing (cargo-fuzz / libFuzzer) of every parser that takes client bytes.
# Included from the root Makefile; paths are relative to the repository root. See fuzz/README.md.
#
#   make fuzz-tools   cargo-fuzz and the nightly toolchain, if missing
#   make fuzz-build   build every harness (about 10 minutes from clean on 2 cores)
#   make fuzz         FUZZ_RUNS executions of each harness, growing fuzz/corpus/<harness>/
#   make fuzz-smoke   every committed regression input, then a few seconds of each harness on
#                     its seeds; exits non-zero on any crash, leak, OOM or timeout
#
# Seeds (fuzz/seeds/, committed) start every run; the working corpus (fuzz/corpus/) and crash
# artifacts (fuzz/artifacts/) are ignored. libFuzzer's memory limits stay at 2 GiB
# (-rss_limit_mb, and -malloc_limit_mb follows it): that is what catches a decode bomb.

FUZZ_TARGETS       := image multipart_and_json_batch kserve labelstudio api_keys explain
FUZZ_DIR           := fuzz
FUZZ_CARGO         ?= cargo +nightly
FUZZ_RUNS          ?= 1000000
FUZZ_SMOKE_SECONDS ?= 5
# Flags for every harness, then per harness (images need larger inputs and time to decode).
FUZZ_FLAGS         ?= -rss_limit_mb=2048 -timeout=60
FUZZ_FLAGS_image   ?= -max_len=65536

.PHONY: fuzz fuzz-tools fuzz-build fuzz-smoke $(addprefix fuzz-run-,$(FUZZ_TARGETS)) \
        $(addprefix fuzz-smoke-,$(FUZZ_TARGETS))

fuzz-tools:
	@rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

fuzz-build: fuzz-tools
	$(FUZZ_CARGO) fuzz build --fuzz-dir $(FUZZ_DIR)

fuzz: $(addprefix fuzz-run-,$(FUZZ_TARGETS))

$(addprefix fuzz-run-,$(FUZZ_TARGETS)): fuzz-run-%: fuzz-build
	@mkdir -p $(FUZZ_DIR)/corpus/$*
	$(FUZZ_CARGO) fuzz run --fuzz-dir $(FUZZ_DIR) $* $(FUZZ_DIR)/corpus/$* $(FUZZ_DIR)/seeds/$* -- \
	  -runs=$(FUZZ_RUNS) -print_final_stats=1 $(FUZZ_FLAGS) $(FUZZ_FLAGS_$*)

fuzz-smoke: $(addprefix fuzz-smoke-,$(FUZZ_TARGETS))

# Each committed regression input is replayed on its own first. Then the harness runs on its
# seeds alone, its new inputs going to a scratch folder emptied each time (never into the
# committed seeds, and the long-run corpus does not make the smoke test slower as it grows).
$(addprefix fuzz-smoke-,$(FUZZ_TARGETS)): fuzz-smoke-%: fuzz-build
	@set -e; for f in $(wildcard $(FUZZ_DIR)/regressions/$*/*); do \
	  echo "fuzz-smoke: replaying $$f"; \
	  $(FUZZ_CARGO) fuzz run --fuzz-dir $(FUZZ_DIR) $* $$f -- $(FUZZ_FLAGS) $(FUZZ_FLAGS_$*); \
	done
	@rm -rf $(FUZZ_DIR)/target/smoke-corpus/$* && mkdir -p $(FUZZ_DIR)/target/smoke-corpus/$*
	$(FUZZ_CARGO) fuzz run --fuzz-dir $(FUZZ_DIR) $* $(FUZZ_DIR)/target/smoke-corpus/$* $(FUZZ_DIR)/seeds/$* -- \
	  -max_total_time=$(FUZZ_SMOKE_SECONDS) -print_final_stats=1 $(FUZZ_FLAGS) $(FUZZ_FLAGS_$*)
