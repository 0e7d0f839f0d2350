"""One client of the example: its own model, its own DataLoader and its own loop; OrMo runs on the server.

From the repository root (the package installed with `pip install -e .`):

    ps-server --model examples.byom.model:build --dataset examples.byom.data:load --workers 4 \\
              --batch-size 32 --lr 0.05 --epochs 15 --bind 127.0.0.1:50051 --out runs/byom &
    for k in 0 1 2 3; do python -m examples.byom.train --server 127.0.0.1:50051 --seed $k & done; wait

Each client prints a JSON line with the test accuracy of the run's final parameters (about 0.98).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from examples.byom.data import load
from examples.byom.model import build
from ormo_ps import RemoteOptimizer, recompute_batchnorm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051", help="the ps-server's HOST:PORT")
    parser.add_argument("--seed", type=int, default=0, help="this client's mini-batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (clients share the machine's cores)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    train, test = load()
    model = build(num_classes=10, input_shape=(1, 8, 8))
    opt = RemoteOptimizer(model, server=args.server)  # waits for the run to start; loads its parameters
    loader = DataLoader(train, batch_size=opt.run_config["batch_size"], shuffle=True, drop_last=True)
    steps = 0
    while not opt.done:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss)  # the gradient goes to the server; its answer is loaded into the model
            steps += 1
            if opt.done:
                break

    # The model holds the run's final parameters; BatchNorm statistics are each client's own: set them there.
    recompute_batchnorm(model, [x for x, _ in DataLoader(train, batch_size=256)])
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(json.dumps({"worker": opt.worker_id, "steps": steps, "iteration": opt.iteration,
                      "test_accuracy": round(accuracy, 4)}))


if __name__ == "__main__":
    main()
