"""Files: checkpoints (every pgraft format), the run store (run directory layout, stage keys), data sets
and recipes. Imports models and core."""
