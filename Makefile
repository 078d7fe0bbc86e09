# `make run`: set up .venv and run the whole pipeline on the built-in cohort (dvc repro).
# `make test`: set up .venv and run the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip on these machines prints one warning per missing local index folder; hide only those lines
# (pipefail keeps pip's own exit status; the braces keep grep's "nothing left" from failing).
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help install run suite test lint compile images bench clean

help:
	@echo "make run      set up .venv, then dvc repro the whole pipeline on the built-in cohort"
	@echo "make test     set up .venv, then run the test suite"
	@echo "make suite    external validation, ablations, baselines, 3 seeds each, claims table (after make run)"
	@echo "make lint     ruff + import-linter (layers contract)"
	@echo "make compile  compile the Kubeflow pipeline to pipeline.yaml"
	@echo "make images REGISTRY=host/path   build + push the CPU and CUDA stage images (needs a Docker engine)"
	@echo "make bench    run the benchmarks under bench/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(BIN)/pip install -q torch==2.13.0 $(PIP_QUIET)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt $(PIP_QUIET)
	$(BIN)/pip install -q --no-deps -e . $(PIP_QUIET)
	$(BIN)/python -c "import torch, meddiff; print('meddiff environment ready, torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo ""
	@echo "Reports:"
	@echo "  reports/ingest/validation.json     records in / accepted / quarantined"
	@echo "  reports/preprocess/data_card.md    counts per class, site, split, modality"
	@echo "  reports/evaluate/metrics.json      AUC, F1, accuracy; robustness.csv (AUC vs masking)"
	@echo "  reports/generate/metrics.json      synthetic-data quality"
	@echo "  reports/explain/index.html         attributions and Dice against lesion masks"
	@echo "  reports/predict/predictions.csv    the champion's probabilities for the new patients (data/raw_new)"
	@echo "  reports/predict/risk_assessments.ndjson   the same as FHIR R4 RiskAssessments"
	@echo "  MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db"

suite: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro suite/dvc.yaml
	@echo "Reports: reports/evaluate/suite.md, suite.html, summary.md, claims.md, claims.json;"
	@echo "         reports/external/metrics.json (the model of make run on the 2,000-patient external drop)"

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src components pipelines tests bench docker
	$(BIN)/lint-imports

compile: $(STAMP)
	$(BIN)/meddiff pipeline compile --output pipeline.yaml

# Build and push docker/Dockerfile and docker/Dockerfile.cuda as $(REGISTRY)/meddiff:<version>-<commit>[-cuda]
# through the Docker SDK (docker/build_images.py); IMAGES_FLAGS=--no-push builds only. See docs/kubeflow.md.
ifneq ($(filter images,$(MAKECMDGOALS)),)
ifeq ($(strip $(REGISTRY)),)
$(error REGISTRY is not set: make images REGISTRY=registry.example.com/meddiff)
endif
endif
images: $(STAMP)
	$(BIN)/python docker/build_images.py --registry "$(REGISTRY)" $(IMAGES_FLAGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf data models reports mlruns.db mlartifacts .pytest_cache
