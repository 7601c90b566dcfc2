"""Experiment grids (`aepo experiment`) and their report."""
