"""The training framework each rank runs: model, data, optimizer, train loop, metrics."""
