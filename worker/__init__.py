"""The worker: gradient loop and gRPC client."""
