"""The paper's whole CIFAR-10 table on one GPU in about 9 minutes: 6 methods x K 16/64 x hom./het., ResNet20.

    python -m bench.paper_table --data-dir ../shared/data/cifar10-jpeg.tar.gz   # a GPU; results in bench/results/paper_table
    python -m bench.paper_table --smoke --out /tmp/paper-smoke                  # the same code on a CPU, tiny (tests)

What runs: bench/convergence.py's `--variant paper`, the paper's recipe (ResNet20, all 50,000 CIFAR-10
training images, batch 128 per worker, eta per method family and K (ASGD 0.1 / 0.01, the momentum methods
0.01 / 0.001 at K=16 / 64: one eta of 0.1 for all diverged, bench/results/paper_table_eta0.1/) with warm-up
and x0.1 at 50% and 75% of the run, beta 0.9, weight decay 1e-4; het.: a quarter of the workers 4x slower;
one seed), 24 simulator runs, each computing its
workers' outstanding gradients batched on the GPU (sim/batched.py), data and augmentation on the GPU; then
the paper-format tables (test accuracy, training loss) and the figures, from report/, in OUT/README.md.
`--data-dir` takes the image folders, the python batches or the `.tar.gz` of the images (extracted first).

Measured on one H200 (bench/results/paper_table/README.md): 43,500 images/s with six runs at a time, the GPU
96-99 % busy (so more processes would not help), 7,100-8,400 images/s per run; 14 epochs of all 24 runs,
~370 s of runs. Hence the default of 14 epochs within the default budget of 500 s. The 160-epoch table would
take about 75 minutes. What was estimated before any GPU run, kept for its reasoning:

- Work. An epoch is 50,000 / 128 = 390 server iterations, each one gradient of 128 images, so a run of E
  epochs computes E x 50,000 image gradients (plus at most K computed ahead and unused at its end, and ten
  evaluations of about 15,000 forward images each, ~6% more at E = 16). The table at 160 epochs:
  24 x 160 x 50,000 = 192M image gradients (62,400 iterations per run).
- Speed. ResNet20's forward and backward are about 0.25 GFLOP per 32x32 image. Batched over 64 workers its
  convolutions are grouped convolutions (64 groups of 16-64 channels) followed by unfused BatchNorm and ReLU,
  which are bound by memory traffic (a few MB of activations per image), so we expect a fifth or less of an
  H200's FP32 peak: about 50,000 images/s (a 64 x 128-image call in ~160 ms), and plan for 25,000-150,000.
  The issue's guess, 20-40 ms per 64 x 128 images (200,000-400,000 images/s), would need dense tensor-core
  convolutions; we do not count on it. At 50,000 images/s the 160-epoch table takes 192M / 50,000 = 64
  minutes: it does not fit.
- Budget. A lent GPU machine gives about 15 minutes in all, a command at most 10. The script's own clock
  (`--budget`, default 500 s) covers everything: extracting and decoding the 60,000 images (~10 s), six
  processes importing torch, starting CUDA and copying the data to the GPU (~15 s), the runs, then tables
  and figures; the runs get a deadline 40 s before the budget ends. That leaves about 430 s of training:
  at 50,000 images/s, 21.5M image gradients = 24 runs x 18 epochs. The default is 16 epochs (a tenth of the
  paper's 160; warm-up 0.5 epochs, the decays at epochs 8 and 12): 19.2M + evaluations, about 400 s at the
  estimate. Slower than estimated, the deadline stops the runs still going (each checks after every epoch)
  and the table is written with what finished, unfinished cells marked with their last evaluation; since
  runs go column by column (K=16 hom., K=16 het., K=64 hom., K=64 het.), the finished columns are whole.
  The README records the images/s reached, from which the next session can choose `--epochs`.
- Concurrency. Six runs at a time (one per method of a column) share the GPU as separate processes: each
  alternates a batched call (the GPU's work) with the server updates of the iterations it makes possible
  (Python and small kernels, ~0.2-0.3 ms per iteration, ~15-20 ms after a 64-worker call), so one process
  alone would leave the GPU idle between calls. Memory: a batched ResNet20 call holds about 2.2 MiB per
  image on the CPU (bench/results/batched_sim.md); planning for 4 on the GPU (cuDNN workspaces, the
  allocator's cache), at most 32 workers x 128 images per call (`--batch-limit`) is ~16 GiB per process, ~100 GiB for six, under the H200's 139 GiB. A process that fails (out of memory) loses its
  run only; the table names it.
- On a GPU the convolutions run in TF32 (PyTorch's default for cuDNN) and cuDNN's backward is not bit-
  deterministic: runs are reproducible to rounding, not bit for bit as on the CPU.

`--smoke` runs the same code (`--variant paper-smoke`: strided-cnn on the bundled digits, batch 16, 40
iterations per run, batched on the CPU, two processes) in about a minute; tests/test_paper_table.py runs it.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench import convergence, harness

# Where the CIFAR-10 images may be (the archive of ../shared/data; /data/ is git-ignored, so a GPU machine
# gets it when a run carries data/cifar10-jpeg.tar.gz).
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
DATA_CANDIDATES = [harness.REPO / "data" / ARCHIVE_NAME, harness.REPO.parent / "shared" / "data" / ARCHIVE_NAME,
                   harness.REPO / "shared" / "data" / ARCHIVE_NAME]
PAPER_EPOCHS = convergence.VARIANTS["paper"]["epochs"]
REPORT_RESERVE_S = 40.0  # the end of the last epochs, the final evaluations, tables and figures


def image_folders(data_dir: Path) -> Path:
    """`data_dir` itself, or where its `.tar.gz` of image folders is extracted (a temporary directory)."""
    if not data_dir.name.endswith((".tar.gz", ".tgz")):
        return data_dir
    dest = Path(tempfile.mkdtemp(prefix="cifar10-"))
    with tarfile.open(data_dir) as tar:
        tar.extractall(dest, filter="data")
    return next(p.parent for p in sorted(dest.rglob("train")) if p.is_dir() and (p.parent / "test").is_dir())


def main(argv: list[str] | None = None) -> None:
    t0 = time.monotonic()
    p = harness.parser("paper_table", __doc__, out="paper_table")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"CIFAR-10: image folders, python batches or a .tar.gz of the images (default: the first "
                        f"of {', '.join(str(c) for c in DATA_CANDIDATES)} that exists)")
    p.add_argument("--epochs", type=float, default=14.0, help=f"epochs per run (the paper: {PAPER_EPOCHS:g})")
    p.add_argument("--jobs", type=int, default=6, help="runs at a time (processes sharing the GPU)")
    p.add_argument("--batch-limit", type=int, default=32, help="at most this many workers' gradients per batched call")
    p.add_argument("--budget", type=float, default=500.0,
                   help=f"seconds for the whole command: the runs stop {REPORT_RESERVE_S:g} s before it ends and the "
                        "table is written")
    p.add_argument("--device", default="cuda", help="where the runs compute (cuda, cuda:N)")
    p.add_argument("--smoke", action="store_true",
                   help="the same code at a tiny scale on the CPU (strided-cnn on digits, 40 iterations per run)")
    args = p.parse_args(argv)
    if args.smoke:
        common = ["--variant", "paper-smoke", "--device", "cpu", "--jobs", "2", "--batched", "on"]
    else:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            p.error("no CUDA device here: this runs the table on a GPU (--smoke checks the script on a CPU)")
        data_dir = args.data_dir or next((c for c in DATA_CANDIDATES if c.exists()), None)
        if data_dir is None:
            p.error("--data-dir is needed (CIFAR-10 image folders, python batches or the images' .tar.gz)")
        data_dir = image_folders(data_dir)
        from ormo_ps.common.data import load_dataset

        load_dataset("cifar10", str(data_dir))  # decoded once here, cached for the six processes
        # The allocator grows its segments instead of fragmenting them between calls of different sizes.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        common = ["--variant", "paper", "--data-dir", str(data_dir), "--device", args.device, "--epochs",
                  f"{args.epochs:g}", "--jobs", str(args.jobs), "--batched", "on"]
    deadline = args.budget - REPORT_RESERVE_S - (time.monotonic() - t0)
    print(f"paper_table: 24 runs, {args.jobs if not args.smoke else 2} at a time; they stop in {deadline:.0f} s at "
          f"the latest", file=sys.stderr)
    convergence.main([*common, "--seeds", "1", "--batch-limit", str(args.batch_limit), "--deadline",
                      f"{max(deadline, 0):.0f}", "--out", str(args.out)])


if __name__ == "__main__":
    main()
