# convnext-deploy. `make setup` then `make test` on a fresh machine; see README.md.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
PIP      := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
EXTRAS   ?= onnxruntime,openvino,coreml,dev
VARIANT  ?= atto
TARGET   ?= onnxruntime
RECIPE   ?= auto
RUN_DIR  :=
DEVICE   :=
CLI      := $(BIN)/convnext-deploy
FMNIST   := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt venv setup-emulation reference test test-all deploy bench bench-full bench-scale benchmarks matrix clean

setup: apt venv setup-emulation

# qemu-user-static: the tests run the INT8 numerics of x86 without VNNI under `qemu-x86_64-static -cpu Haswell-v4`
apt:
	@if [ ! -f $(FMNIST) ] || ! command -v chromium >/dev/null || ! command -v qemu-x86_64-static >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
			chromium qemu-user-static; \
	fi

venv:
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[$(EXTRAS)]"

# aarch64 under qemu user mode (qemu ≥ 8.2 from bookworm-backports, arm64 Python 3.11, aarch64 wheels), built once
# into $$CONVNEXT_DEPLOY_EMULATION (default ~/.cache/convnext-deploy/emulation) without touching apt's own setup.
setup-emulation:
	$(BIN)/python -m convnext_deploy.pipeline.device.emulation_setup

# Train (or resume, or reuse) the reference checkpoint of VARIANT on Fashion-MNIST.
reference:
	$(CLI) reference --variant $(VARIANT) $(if $(EPOCHS),--epochs $(EPOCHS))

# The atto reference is the fixture every later stage uses: the repository keeps it (reference/, trained by this
# project); `reference` only trains it where it is missing.
# The CPU first: the suite's time, and which INT8 path its numerics took, depend on it.
test:
	@lscpu | grep -E '^(Vendor ID|Model name|CPU family|Model|CPU\(s\)):' || true
	$(CLI) reference --variant atto
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-all:
	$(CLI) reference --variant atto
	$(BIN)/python -m pytest -q

# RUN_DIR=DIR: the report folder (default runs/<TARGET>-<VARIANT>), read from the command line only; DEVICE=NAME: a device
# profile (`convnext-deploy deploy --help`), emulated when this machine is not it
deploy:
	$(CLI) deploy --target $(TARGET) --variant $(VARIANT) --recipe "$(RECIPE)"$(if $(DEVICE), --device "$(DEVICE)")$(if $(RUN_DIR), --out "$(RUN_DIR)")

# Speed ratios on this CPU, bounded to minutes (bench-full: the whole grid, much longer); each writes its result
# under benchmarks/<cpu>-<date>/ and regenerates BENCHMARKS.md from every result there.
bench:
	$(BIN)/python -m convnext_deploy.pipeline.bench
	$(MAKE) --no-print-directory benchmarks

bench-full:
	$(BIN)/python -m convnext_deploy.pipeline.bench --full
	$(MAKE) --no-print-directory benchmarks

# Every variant T…XL deployed as a user would (official .pth, 1,000 classes, --calib 100 --eval 200), one row each:
# stage seconds and process-tree peaks against 3 GiB + 4 × the weights, FP32/INT8 p50. VARIANTS=b for one row;
# SCALE_SIZE=384: checkpoints fine-tuned at 384 px, deployed at 384 (scale-<target>-384.json).
VARIANTS ?= t,s,b,l,xl
SCALE_MINUTES ?= 150
SCALE_SIZE ?= 224
bench-scale:
	$(BIN)/python -m convnext_deploy.pipeline.bench_scale --variants $(VARIANTS) --target $(TARGET) \
		--minutes $(SCALE_MINUTES) --image-size $(SCALE_SIZE)
	$(MAKE) --no-print-directory benchmarks

# BENCHMARKS.md from the committed results benchmarks/*/*.json (tests/test_benchmarks_doc.py keeps them equal).
benchmarks:
	$(BIN)/python -m convnext_deploy.reports.benchmarks

# One table (Markdown + HTML) of every deploy report under runs/, e.g. the CI deploy matrix's downloaded reports.
matrix:
	$(CLI) summarize runs/*/report.json --out runs/matrix

clean:
	rm -rf runs .cache .pytest_cache
