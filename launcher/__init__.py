"""The `moe-launch` CLI: compose and validate the config, then start the ranks."""
