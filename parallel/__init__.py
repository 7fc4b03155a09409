"""Parallelism applied to a plain model: the device mesh, data/expert sharding, pipelines."""
