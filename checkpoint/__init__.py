"""Distributed checkpoints: save/load with DCP, atomic commit, resharding on resume."""
