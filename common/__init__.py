"""Shared by server and worker: config, tensor codec, models, data, metrics, generated stubs."""
