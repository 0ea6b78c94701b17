"""Options: the render command line and config files, derived from `schemas.config`, and storage options."""
