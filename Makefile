# Developer entry points. Generated stubs in common/pb/ are committed; `make proto` refreshes them
# and tests/test_proto.py fails when they are stale.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: help install install-test proto test test-fast launch sim bench-stability

help:
	@echo "make install      install the package (pinned torch, grpc) in editable mode"
	@echo "make launch       run ps-launch on the embedded default (digits, 4 local workers)"
	@echo "make sim          run ps-sim on the embedded default"
	@echo "make test         install with test extras and run the whole test suite"
	@echo "make test-fast    the tests without the slow (multi-process, training) ones"
	@echo "make proto        regenerate the gRPC stubs in common/pb/ from proto/ps/v1/"
	@echo "make bench-stability  OrMo vs naive ASGDm across learning rates (bench/results/stability.md)"

install:
	$(PIP) install -e .

install-test:
	$(PIP) install -e '.[test]'

proto:
	$(PYTHON) -m common.pb.generate common/pb

test: install-test
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

launch: install
	ps-launch

sim: install
	ps-sim

bench-stability:
	$(PYTHON) bench/stability.py
