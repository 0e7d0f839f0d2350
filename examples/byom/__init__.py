"""Bring your own model: a model and a data loader that are not in OrMo-PS's registries, trained through
`ormo_ps.RemoteOptimizer` by client processes against a ps-server, and by import path in ps-sim."""
