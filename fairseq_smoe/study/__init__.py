"""System comparisons: train the paper's systems, decode every test set, tabulate; reference baselines."""
