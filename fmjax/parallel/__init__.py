"""Parallelism as configuration: the mesh, logical-axis rules and their checks."""
