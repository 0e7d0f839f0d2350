"""What the throughput benchmark measures: the systems, the model sizes, K and windows per size, the goals."""

from __future__ import annotations

SYSTEMS = ("server", "echo", "torch-rpc")
RESNET20_NUMEL = 269_722  # ResNet20 with 10 classes (checked against the registry at start-up)
SIZES = {
    "resnet20": RESNET20_NUMEL,
    "11M": 11_173_962,  # ResNet-18 for CIFAR-10
    "25M": 25_557_032,  # ResNet-50 for ImageNet
}
SIZE_NOTES = {
    "resnet20": "ResNet20 (`--model resnet20 --dataset synthetic`, 3x8x8 inputs, 10 classes)",
    "11M": "flat-11173962: a flat vector the size of ResNet-18 for CIFAR-10 (bench/ps_server_sized.py)",
    "25M": "flat-25557032: a flat vector the size of ResNet-50 for ImageNet (bench/ps_server_sized.py)",
}
# (K values, windows per system, minimum window seconds) per size. The large sizes get fewer K and two
# windows each: a 45-100 MB round trip takes 0.5-2 s through gRPC here and a window must see a reply from
# every pusher (25M with K=4 alone took two minutes), 16 pushers hold ~3 GB per system, and the whole
# run keeps to ~8 minutes on 2 cores.
FULL_PLAN = {"resnet20": ((1, 4, 16, 64), 3, 2.0), "11M": ((1, 4), 2, 4.0), "25M": ((1,), 2, 4.0)}
QUICK_PLAN = {"resnet20": ((16,), 2, 1.5)}
GOAL_ECHO_FRACTION = 0.9
GOAL_K, GOAL_SIZE = 16, "resnet20"
