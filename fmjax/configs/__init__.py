"""Shipped run configs: `get_config()` files, found by name (`--config default`) or path."""
