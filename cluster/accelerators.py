"""GPU types the defaults and the planner know: memory and dense fp16 peak per Ray ``accelerator_type``, and the
names torch and users give them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Accelerator:
    """What the defaults and the planner know of one GPU type (Ray's ``accelerator_type:<type>`` resource)."""

    memory_bytes: float
    peak_tflops: float  # dense fp16/bf16 tensor-core peak (vendor data sheets)


ACCELERATORS = {
    "T4": Accelerator(memory_bytes=16e9, peak_tflops=65),
    "V100": Accelerator(memory_bytes=16e9, peak_tflops=125),
    "P100": Accelerator(memory_bytes=16e9, peak_tflops=21),
    "A10G": Accelerator(memory_bytes=24e9, peak_tflops=70),
    "L4": Accelerator(memory_bytes=24e9, peak_tflops=121),
    "L40S": Accelerator(memory_bytes=48e9, peak_tflops=362),
    "A100": Accelerator(memory_bytes=40e9, peak_tflops=312),  # the smaller of the two A100s
    "A100-40G": Accelerator(memory_bytes=40e9, peak_tflops=312),
    "A100-80G": Accelerator(memory_bytes=80e9, peak_tflops=312),
    "H100": Accelerator(memory_bytes=80e9, peak_tflops=989),  # SXM
    "H100-PCIE": Accelerator(memory_bytes=80e9, peak_tflops=756),
    "H100-NVL": Accelerator(memory_bytes=94e9, peak_tflops=835),
    "H200": Accelerator(memory_bytes=141e9, peak_tflops=989),  # SXM
    "H200-NVL": Accelerator(memory_bytes=141e9, peak_tflops=835),
    "GH200": Accelerator(memory_bytes=96e9, peak_tflops=989),  # the 96 GB HBM3 part (144 GB HBM3e: same peak)
    "B200": Accelerator(memory_bytes=180e9, peak_tflops=2250),
}


def canonical_accelerator(name: str) -> str:
    """The `ACCELERATORS` key ``name`` names, whatever its case and separators (``h200 nvl`` -> ``H200-NVL``), else
    ``name`` as given."""
    wanted = "-".join(name.upper().replace("_", "-").split())
    return next((key for key in ACCELERATORS if key.upper() == wanted), name)


def accelerator_spec(name: str) -> Accelerator | None:
    """What `ACCELERATORS` knows of the type ``name`` (`canonical_accelerator`), or None."""
    return ACCELERATORS.get(canonical_accelerator(name))


def accelerator_from_device_name(device_name: str) -> str | None:
    """The `ACCELERATORS` key of a device as torch names it (``NVIDIA H200 NVL`` -> ``H200-NVL``, ``NVIDIA GH200
    480GB`` -> ``GH200``): the longest key whose parts appear in the name, in order; None when none does."""
    parts = device_name.upper().replace("_", " ").replace("-", " ").split()
    joined = " " + " ".join(parts) + " "
    found = [key for key in ACCELERATORS if " " + " ".join(key.upper().split("-")) + " " in joined]
    return max(found, key=len) if found else None
