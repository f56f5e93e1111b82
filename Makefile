PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCE ?= ../shared/data/pklot/PUCPR/Sunny
MODEL ?= ../shared/models/yolov8n-coco.pt
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/parkmon demo --source '$(SOURCE)' --model '$(MODEL)'

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) var
