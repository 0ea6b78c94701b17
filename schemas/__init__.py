"""Data contracts of kandinsky-render: manifest, work items, results, job config, output keys.

Pure Python + pyarrow + numpy: nothing here imports torch, ray or diffusers.
"""
