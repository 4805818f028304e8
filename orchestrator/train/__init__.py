"""The worker side: model + adapter, data, checkpoints, and the one training loop."""
