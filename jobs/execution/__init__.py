"""Execution: the render job, its stage chain, and the runners that push work through it (Ray or in-process)."""
