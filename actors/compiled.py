"""torch.compile for the model actors: what is compiled, which shapes it serves, and the way back to eager.

The decoder's UNet is compiled whole (``fullgraph=True``: a graph break would be an error, not a silent
slowdown) with static shapes, and so is its MoVQ ``decode``; the prior's transformer with dynamo's own
choice of dynamic shapes. A decoder actor compiles every shape its run will call before it counts as
ready (`actors.decoder`); after that a `ShapeGuard` sends a shape nobody warmed up to the plain
forward, with one warning, instead of compiling it inside a call (minutes past its deadline). A
compile that fails turns the actor's modules eager (`run_eagerly`). Compiled code is cached on the
node (`compile_cache_dir`), so a restarted actor, or the next run, loads it instead of compiling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from schemas.loggers import logger_for

logger = logger_for(__name__)

CACHE_ENV = "KANDINSKY_RENDER_CACHE"  # per-node cache folder (default ~/.cache/kandinsky-render)
# Shapes one compiled module may be compiled for: the run's image sizes x both guidance shapes x the batch sizes
# out-of-memory splits make, warmed up at start.
RECOMPILE_LIMIT = 64
_COMPILED_DECODE = "_kandinsky_compiled_decode"  # set on a MoVQ whose ``decode`` is compiled: its plain one


def pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """A pipeline's torch modules, by component name."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def compile_pipeline(pipe: Any, *, cuda_graphs: bool = False) -> None:
    """Compile ``pipe``'s denoiser in place (pipelines keep reading ``.dtype`` / ``.config`` of the same module):
    a decoder's UNet whole with static shapes, and its MoVQ ``decode``; a prior's transformer with dynamic shapes.
    ``cuda_graphs``: the decoder's compiled code replays CUDA graphs (inductor's ``reduce-overhead``). Compiling
    happens at the first call of each shape, under a `ShapeGuard` (see the module docstring)."""
    from torch import _dynamo

    use_compile_cache()
    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    mode = "reduce-overhead" if cuda_graphs else None
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, torch.nn.Module):
        unet.compile(dynamic=False, fullgraph=True, mode=mode)
        unet._compiled_call_impl = ShapeGuard(unet._compiled_call_impl, eager=unet._call_impl, name="UNet")
        movq = getattr(pipe, "movq", None)
        if isinstance(movq, torch.nn.Module) and not hasattr(movq, _COMPILED_DECODE):
            plain = movq.decode
            setattr(movq, _COMPILED_DECODE, plain)
            compiled = torch.compile(plain, dynamic=False, mode=mode)
            movq.decode = ShapeGuard(compiled, eager=plain, name="MoVQ decode")
    prior = getattr(pipe, "prior", None)
    if isinstance(prior, torch.nn.Module):
        prior.compile(dynamic=None)


class ShapeGuard:
    """A compiled callable that serves only the input shapes it was warmed up with (`warming`): any other shape
    runs ``eager``, with one warning per guard, rather than compiling in the middle of a call."""

    def __init__(self, compiled: Any, *, eager: Any, name: str) -> None:
        self.compiled, self.eager, self.name = compiled, eager, name
        self.shapes: set[tuple] = set()
        self.warming = True  # until `seal`: every shape seen is compiled and allowed
        self._warned = False

    def seal(self) -> None:
        """The warm-up is over: shapes not seen so far run eagerly."""
        self.warming = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shape = _shape(args, kwargs)
        if self.warming:
            self.shapes.add(shape)
        elif shape not in self.shapes:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "%s: input shape %s was not compiled at start (warmed: %s); it runs eagerly",
                    self.name,
                    shape,
                    sorted(self.shapes),
                )
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def _shape(args: tuple, kwargs: dict) -> tuple:
    """The shape of a call's first tensor argument (the UNet's ``sample``, the MoVQ's latents)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return ()


def guards(modules: list[Any]) -> list[ShapeGuard]:
    """The shape guards of compiled ``modules`` (UNet calls and MoVQ decodes)."""
    found = [getattr(module, "_compiled_call_impl", None) for module in modules]
    found += [module.decode for module in modules if hasattr(module, _COMPILED_DECODE)]
    return [guard for guard in found if isinstance(guard, ShapeGuard)]


def compiled_modules(pipe: Any) -> list[torch.nn.Module]:
    """The modules of ``pipe`` that `compile_pipeline` compiled (and that still are)."""
    return [
        module
        for module in pipeline_modules(pipe).values()
        if module._compiled_call_impl is not None or hasattr(module, _COMPILED_DECODE)
    ]


def run_eagerly(modules: list[torch.nn.Module]) -> None:
    """Undo the compile of ``modules``: their next calls run the plain forward (and the plain MoVQ decode)."""
    for module in modules:
        module._compiled_call_impl = None
        if hasattr(module, _COMPILED_DECODE):
            module.decode = getattr(module, _COMPILED_DECODE)
            delattr(module, _COMPILED_DECODE)


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.compile itself (dynamo, inductor, Triton), not from the model.

    (An out-of-memory error raised while compiled code runs is not one: it splits the call.)
    """
    return any(cls.__module__.startswith(("torch._dynamo", "torch._inductor", "triton")) for cls in type(exc).__mro__)


def compile_cache_dir() -> Path:
    """Where this node keeps torch.compile's caches: ``$KANDINSKY_RENDER_CACHE/inductor``, else
    ``~/.cache/kandinsky-render/inductor``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kandinsky-render")
    return Path(root) / "inductor"


def use_compile_cache() -> str | None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels, autotuning) at
    `compile_cache_dir`, so an actor that restarts, or the next run on this node, loads compiled
    code instead of compiling again. A ``TORCHINDUCTOR_CACHE_DIR`` already set wins. Returns the
    folder, or None (with a warning; inductor's default under /tmp is used) if it cannot be written.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        logger.warning("compile cache %s unusable (%s); using inductor's default", path, exc)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)
