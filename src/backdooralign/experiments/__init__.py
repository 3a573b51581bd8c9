"""Experiments: config, resumable stages, one run, sweeps."""
