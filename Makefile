# Developer entry points. Generated stubs in common/pb/ are committed; `make proto` refreshes them
# and tests/test_proto.py fails when they are stale.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: help install install-test proto deploy-env test test-fast test-containers test-cluster image launch sim bench-quick bench bench-stability paper-table

help:
	@echo "make install      install the package (pinned torch, grpc) in editable mode"
	@echo "make launch       run ps-launch on the embedded default (digits, 4 local workers)"
	@echo "make sim          run ps-sim on the embedded default"
	@echo "make test         install with test extras and run the whole test suite"
	@echo "make test-fast    the tests without the slow (multi-process, training) ones"
	@echo "make image        build the Docker image ormo-ps:0.1.0 (deploy/build-image.sh; no registry needed)"
	@echo "make test-containers  a Docker engine and Compose (deploy/docker-host.sh), the image, tests/test_containers.py"
	@echo "make test-cluster a Slurm cluster of network namespaces (root; installs slurm-wlm, munge), tests/test_cluster.py"
	@echo "make proto        regenerate the gRPC stubs in common/pb/ from proto/ps/v1/"
	@echo "make deploy-env   write the run's settings (server/config.py) into docker-compose.yml and deploy/k8s/run.env"
	@echo "make bench-quick  the benchmarks in minutes (results in bench/results/)"
	@echo "make bench        the longer benchmarks (CIFAR-10 from DATA_DIR, default ../shared/data extracted)"
	@echo "make paper-table  the paper's CIFAR-10 table on one GPU in about 9 minutes (bench/paper_table.py)"

install:
	$(PIP) install -e .

install-test:
	$(PIP) install -e '.[test]'

proto:
	$(PYTHON) -m ormo_ps.common.pb.generate common/pb

deploy-env:
	$(PYTHON) deploy/environment.py

test: install-test
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

test-cluster: install-test
	ORMO_TEST_CLUSTER=1 $(PYTHON) -m pytest -q -s -m cluster tests/test_cluster.py

image:
	deploy/build-image.sh

# Starts a Docker engine when none answers (and stops it again afterwards), builds the image, runs the tests.
test-containers: install-test
	@started=0; docker info >/dev/null 2>&1 || started=1; \
	deploy/docker-host.sh && $(MAKE) image && $(PYTHON) -m pytest -q -m containers tests/test_containers.py; \
	rc=$$?; [ $$started = 1 ] && deploy/docker-host.sh --stop; exit $$rc

launch: install
	ps-launch

sim: install
	ps-sim

DATA_DIR ?= /tmp/ormo-ps-cifar10

paper-table:
	$(PYTHON) -m bench.paper_table

bench-stability:
	$(PYTHON) -m bench.stability

bench-quick:
	$(PYTHON) -m bench.stability
	$(PYTHON) -m bench.convergence --variant quick
	$(PYTHON) -m bench.update_cost --repeats 10
	$(PYTHON) -m bench.sim_overhead --iterations 20 --repeats 2 --out bench/results/sim_overhead_quick
	$(PYTHON) -m bench.throughput --quick

$(DATA_DIR)/train:
	mkdir -p $(DATA_DIR) && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C $(DATA_DIR)

bench: $(DATA_DIR)/train
	$(PYTHON) -m bench.sim_overhead --data-dir $(DATA_DIR)
	$(PYTHON) -m bench.update_cost
	$(PYTHON) -m bench.throughput
	$(PYTHON) -m bench.convergence --variant cpu --data-dir $(DATA_DIR) --seeds 3
	$(PYTHON) -m bench.convergence --variant k64 --data-dir $(DATA_DIR) --jobs 2
	$(PYTHON) -m bench.batched_sim
	$(PYTHON) -m bench.wallclock --dataset cifar10 --data-dir $(DATA_DIR) --model small-cnn --batch-size 32 --epochs 2 --lr 0.01 --momentum-lr 0.002 --warmup-epochs 0.2 --eval-every 0.25
	$(PYTHON) -m bench.soak --seconds 120
	$(PYTHON) -m bench.chaos
