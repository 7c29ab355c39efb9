"""Stage modules: each has one public `run(cfg) -> manifest dict`. Stages share only artifacts on disk."""
