"""Scaling studies: grids of runs, the sweep that trains and measures them, power-law fits and the report."""
