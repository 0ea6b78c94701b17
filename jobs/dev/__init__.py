"""Development helpers: tiny random-weight checkpoints, the bundled example, diffusers references."""
