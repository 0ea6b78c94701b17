"""Planning: manifests, validation, expansion into per-image work, batches, dry run, GPU-seconds estimates."""
