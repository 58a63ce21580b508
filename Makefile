# onkos — the two commands:
#   make run    install what is missing, then serve the API on 127.0.0.1:8080 (embedded Postgres)
#   make test   install what is missing, then run every check CI runs
# Both install PostgreSQL server binaries and OpenSlide (apt) and the ONNX Runtime library (PyPI wheel)
# when absent.

SHELL := /bin/bash
ORT_VERSION := 1.31.1
ORT_DIR := $(CURDIR)/target/onnxruntime-$(ORT_VERSION)
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
export ORT_DYLIB_PATH ?= $(ORT_LIB)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps postgres openslide lint openapi sqlx-prepare models bench bench-slides fuzz

run: deps
	cargo run --release --locked -- serve

test: deps target/fhir-venv/bin/python target/moto-venv/bin/moto_server target/st-venv/bin/st
	cargo fmt --all -- --check
	docker/check.sh
	SQLX_OFFLINE=true cargo clippy --locked --all-targets -- -D warnings
	SQLX_OFFLINE=true cargo test --locked --all-targets
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)

deps: postgres openslide $(ORT_LIB)

# OpenSlide (the reader for slide formats onkos's own tile reader does not read) and what its
# Rust bindings are generated with at build time.
openslide:
	@if pkg-config --exists openslide 2>/dev/null && ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then \
		echo "OpenSlide $$(pkg-config --modversion openslide), libclang: present"; \
	else \
		echo "OpenSlide: installing (apt-get install libopenslide-dev libclang-dev pkg-config)"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends libopenslide-dev libclang-dev pkg-config; \
	fi

# Server binaries only: onkos starts its own private cluster from them.
postgres:
	@if command -v initdb >/dev/null && command -v postgres >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL server binaries: present"; \
	else \
		echo "PostgreSQL server binaries: installing (apt-get install postgresql)"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends postgresql; \
	fi

# The CPU build of ONNX Runtime, taken from the official PyPI wheel (no compiler, no CDN).
$(ORT_LIB):
	@command -v python3 >/dev/null || { echo "python3 is required to fetch ONNX Runtime"; exit 1; }
	@python3 -m pip --version >/dev/null 2>&1 || { echo "pip: installing python3-pip"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-pip; }
	rm -rf $(ORT_DIR) && mkdir -p $(ORT_DIR)/wheel
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest $(ORT_DIR)/wheel onnxruntime==$(ORT_VERSION)
	python3 -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob('$(ORT_DIR)/wheel/*.whl')[0]); \
		open('$@', 'wb').write(z.read('onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION)'))"
	rm -rf $(ORT_DIR)/wheel
	@echo "ONNX Runtime $(ORT_VERSION): $@"

# The FHIR validator the tests run every Bundle they produce through (fhir.resources, pinned).
target/fhir-venv/bin/python: tests/fhir/requirements.txt
	@python3 -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-venv; }
	rm -rf target/fhir-venv && python3 -m venv target/fhir-venv
	target/fhir-venv/bin/pip install --quiet -r tests/fhir/requirements.txt
	@touch $@

# Regenerate the committed OpenAPI document from the code.
openapi:
	SQLX_OFFLINE=true cargo run --quiet -- openapi > openapi/openapi.json

# Refresh .sqlx/ (compile-time query data) against a migrated database at DATABASE_URL.
sqlx-prepare:
	rm -rf .sqlx && mkdir .sqlx && touch src/lib.rs && SQLX_OFFLINE_DIR=$(CURDIR)/.sqlx cargo check --all-targets

# Retrain the bundled models (pinned requirements; reproduces the committed files).
models:
	python3 -m venv target/models-venv && target/models-venv/bin/pip install -q -r models/requirements.txt
	target/models-venv/bin/python models/train_all.py

# Throughput benchmark (not a test): results go in BENCHMARKS.md.
bench: deps
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends wrk; }
	SQLX_OFFLINE=true cargo build --release --locked
	tests/bench/run.sh


# The slide pipeline against libjpeg-turbo's decode limit and OpenSlide (BENCHMARKS.md).
bench-slides: deps
	@python3 -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-venv; }
	SQLX_OFFLINE=true cargo build --release --locked
	tests/bench/slides.sh

# The S3-compatible server the storage tests run against (moto, pinned).
target/moto-venv/bin/moto_server: tests/s3/requirements.txt
	@python3 -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-venv; }
	rm -rf target/moto-venv && python3 -m venv target/moto-venv
	target/moto-venv/bin/pip install --quiet -r tests/s3/requirements.txt
	touch $@

# Schemathesis, which the hostile-input tests run against the served OpenAPI document (pinned).
target/st-venv/bin/st: tests/schemathesis/requirements.txt
	@python3 -c "import ensurepip" 2>/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends python3-venv; }
	rm -rf target/st-venv && python3 -m venv target/st-venv
	target/st-venv/bin/pip install --quiet -r tests/schemathesis/requirements.txt
	touch $@

# libFuzzer over every parser onkos owns (tests/fuzz, src/fuzzing.rs), FUZZ_SECONDS each; `make test`
# runs it for TEST_FUZZ_SECONDS each. The instrumented build is onkos without its `service` feature
# (the parsers and their ~140 crates, not the service's ~500). Stable Rust, so without a sanitizer
# (`-s none`); with a nightly toolchain, run `cargo +nightly fuzz run --fuzz-dir tests/fuzz <target>`
# by hand for AddressSanitizer. New inputs go to target/fuzz-corpus/<target>, crashes to
# tests/fuzz/artifacts/<target>.
FUZZ_SECONDS ?= 60
TEST_FUZZ_SECONDS ?= 10
FUZZ_FLAGS ?= -s none
FUZZ_TARGETS := manifest features csv_batch embeddings tiff dicom archive
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
	cargo fuzz build --fuzz-dir tests/fuzz --target-dir target/fuzz $(FUZZ_FLAGS)
	@mkdir -p target/fuzz-logs; for t in $(FUZZ_TARGETS); do \
		mkdir -p target/fuzz-corpus/$$t; \
		if cargo fuzz run --fuzz-dir tests/fuzz --target-dir target/fuzz $(FUZZ_FLAGS) $$t \
			target/fuzz-corpus/$$t tests/fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
			-rss_limit_mb=2048 -max_len=65536 > target/fuzz-logs/$$t.log 2>&1; then \
			echo "fuzz $$t, $(FUZZ_SECONDS) s: nothing found; $$(grep -E '^#[0-9]+' target/fuzz-logs/$$t.log | tail -n 1)"; \
		else \
			tail -n 80 target/fuzz-logs/$$t.log; echo "fuzz $$t: FOUND a crash, a hang or a leak (log: target/fuzz-logs/$$t.log)"; exit 1; \
		fi; \
	done
