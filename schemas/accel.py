"""How each model actor runs its pipelines: dtype names and the acceleration options (`AccelOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.numbers import check_range
from schemas.resources import MACHINE_DEFAULT

DTYPES = ("auto", "float32", "float16", "bfloat16")


def dtype_name(dtype: str, *, cuda: bool) -> str:
    """The dtype ``dtype`` (one of `DTYPES`) names on a CUDA device or not: ``auto`` is float16 on CUDA, float32
    elsewhere."""
    if dtype == "auto":
        return "float16" if cuda else "float32"
    return dtype


ATTENTIONS = ("sdpa", "default")


@dataclass(frozen=True, kw_only=True)
class AccelOptions:
    """How each model actor runs its pipelines (actors/accel.py); none of these changes fp32 pixels by > 1 level.

    ``attention``: ``sdpa`` makes every attention layer use torch's scaled_dot_product_attention
    (diffusers' and transformers' default with torch 2); ``default`` is the plain matmul-softmax
    path. ``channels_last`` stores conv weights NHWC (faster convolutions on recent GPUs).
    ``compile`` wraps the decoder UNet (and MoVQ decode) and the prior transformer in ``torch.compile``
    (`actors.compiled`; pays off on long runs); ``cuda_graphs`` makes the compiled decoder replay CUDA
    graphs. ``cpu_offload`` keeps weights in CPU memory and moves each model to the GPU only while it
    runs (diffusers' model CPU offload, for GPUs too small for a stage).
    ``prompt_cache_size``: text encodings kept per prior actor (0 disables the cache).
    """

    attention: str = field(
        default="sdpa", metadata={"choices": ATTENTIONS, "help": "sdpa: torch scaled_dot_product_attention kernels"}
    )
    channels_last: bool | None = field(
        default=None, metadata={"help": "NHWC conv weights", "default_help": MACHINE_DEFAULT}
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the decoder's UNet and MoVQ decode (every shape compiled before an actor is ready; "
            "compile time counts against no wait or deadline) and the prior transformer"
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "with --compile: replay each decoder step as a CUDA graph (one call at a time per decoder actor; "
            "off until measured on your GPUs: kandinsky-render benchmark gpu)"
        },
    )
    cpu_offload: bool = field(
        default=False, metadata={"help": "keep weights in CPU memory, each model on the GPU only while it runs"}
    )
    prompt_cache_size: int = field(default=1024, metadata={"help": "text encodings cached per prior actor (0: off)"})

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        check_range("prompt_cache_size", self.prompt_cache_size, low=0, high=1_000_000)
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (--compile --cuda-graphs)")
