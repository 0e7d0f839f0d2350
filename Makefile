# Developer entry points. Generated stubs in common/pb/ are committed; `make proto` refreshes them
# and tests/test_proto.py fails when they are stale.
PYTHON ?= python

.PHONY: help proto test

help:
	@echo "make proto   regenerate the gRPC stubs in common/pb/ from proto/ps/v1/"
	@echo "make test    run the test suite"

proto:
	$(PYTHON) -m common.pb.generate common/pb

test:
	$(PYTHON) -m pytest -q
