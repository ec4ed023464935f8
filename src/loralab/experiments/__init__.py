"""Experiments: run directories, and loops over runs (seeds, grids, studies)."""
