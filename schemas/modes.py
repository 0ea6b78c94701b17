"""Every fact about a render mode and a prior input in one table: pipelines, checkpoints, inputs, sizes, batching.

Planning (validation, size refusals, batch keys), the decoder and depth stages, the dry run and the
GPU-seconds estimates all read `MODES` and `PRIOR_KINDS`; nothing else names a mode's needs.
"""

from __future__ import annotations

from dataclasses import dataclass

# How a decoder pipeline treats a size that is not a multiple of its rule (diffusers 0.42.1):
ROUND_UP = "round_up"  # silently renders the next multiple (text2img, ControlNet)
ROUND_DOWN = "round_down"  # resizes the source to the previous multiple of the MoVQ scale (img2img): a crop, or a
# latent the UNet cannot take (it halves it 3 times in the public checkpoints) and a crash
CRASH = "crash"  # raises inside the pipeline (inpaint)

# Pipeline keyword argument that carries each image column the decoder reads.
DECODER_INPUT_KWARGS = {"image": "image", "mask": "mask_image", "hint": "hint"}
# Extra words in the "needs a ..." refusal of a missing input.
_INPUT_NOTES = {"mask": " (white = repaint, black = keep)", "hint": " (depth map)"}


@dataclass(frozen=True, kw_only=True)
class Mode:
    """One value of the manifest's ``mode`` column: which decoder renders it and what it needs.

    ``reads``: image columns the decoder uses (a row setting another image column is refused).
    ``required``: image columns that must be set. ``hint_estimated``: a missing ``hint`` is
    estimated from ``image`` by the depth stage. ``partial_schedule``: the pipeline runs only
    ``int(num_inference_steps * strength)`` steps (and crashes at 0). Sides must be
    multiples of ``scale ** 2`` (``scale``: the checkpoint's MoVQ downsampling factor; its latent then
    passes the UNet's downsampling, by 8 in the public checkpoints, as their MoVQ's scale);
    ``size_effect`` says what the pipeline does otherwise. ``square_only``: non-square sizes fail.
    ``batch_inputs``: image columns that must be identical across the rows of one call.
    """

    name: str
    pipeline: str
    checkpoint: str  # key of schemas.models.HUB_MODELS, and the sub-folder of a models directory
    reference: str  # what a row of this mode equals (README, tests)
    reads: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    hint_estimated: bool = False
    partial_schedule: bool = False
    size_effect: str = ROUND_UP
    square_only: bool = False
    batch_inputs: tuple[str, ...] = ()

    def needs_message(self, column: str) -> str:
        """The refusal of a row of this mode without ``column``."""
        article = "an" if column[0] in "aeiou" else "a"
        return f"mode {self.name} needs {article} '{column}'{_INPUT_NOTES.get(column, '')}"

    def size_problem(self, *, height: int, width: int, scale: int) -> str | None:
        """Why this mode cannot render exactly ``height`` x ``width`` with a MoVQ of ``scale``; None if it can."""
        multiple = scale**2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                down, up = value // multiple * multiple, -(-value // multiple) * multiple
                would = {
                    ROUND_UP: f"silently render {up}",
                    ROUND_DOWN: f"silently crop it to {down}" if value - down < scale else "crash",
                    CRASH: "crash",
                }[self.size_effect]
                return (
                    f"{name}={value} is not a multiple of {multiple}: in mode {self.name} the "
                    f"{self.checkpoint} checkpoint would {would}; ask for a multiple of {multiple}"
                )
        if self.square_only and height != width:
            # diffusers 0.42.1 passes (width, height) to preprocess(image, height, width): the image
            # latents come out transposed and no hint fits them.
            return f"mode {self.name} needs a square size in diffusers 0.42.1 (got {height}x{width})"
        return None


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode(
            name="text2img",
            pipeline="KandinskyV22Pipeline",
            checkpoint="decoder",
            reference="KandinskyV22CombinedPipeline",
        ),
        Mode(
            name="img2img",
            pipeline="KandinskyV22Img2ImgPipeline",
            checkpoint="decoder",
            reference="KandinskyV22Img2ImgCombinedPipeline",
            reads=frozenset({"image"}),
            required=frozenset({"image"}),
            partial_schedule=True,
            size_effect=ROUND_DOWN,
        ),
        Mode(
            name="inpaint",
            pipeline="KandinskyV22InpaintPipeline",
            checkpoint="decoder-inpaint",
            reference="KandinskyV22InpaintCombinedPipeline",
            reads=frozenset({"image", "mask"}),
            required=frozenset({"image", "mask"}),
            size_effect=CRASH,
            # diffusers 0.42.1 blends image[:1] / mask[:1] into every row of a call (diffusers #13596).
            batch_inputs=("image", "mask"),
        ),
        Mode(
            name="controlnet",
            pipeline="KandinskyV22ControlnetPipeline",
            checkpoint="controlnet-depth",
            reference="Prior then KandinskyV22ControlnetPipeline",
            reads=frozenset({"image", "hint"}),
            hint_estimated=True,
        ),
        Mode(
            name="controlnet_img2img",
            pipeline="KandinskyV22ControlnetImg2ImgPipeline",
            checkpoint="controlnet-depth",
            reference="Prior then KandinskyV22ControlnetImg2ImgPipeline",
            reads=frozenset({"image", "hint"}),
            required=frozenset({"image"}),
            hint_estimated=True,
            partial_schedule=True,
            square_only=True,
        ),
    )
}
MODE_NAMES = tuple(MODES)
DEFAULT_MODE = "text2img"


@dataclass(frozen=True, kw_only=True)
class PriorKind:
    """One kind of prior input (the work column ``prior_kind``), decided by which manifest columns a row sets.

    ``pipeline``: the diffusers prior pipeline (method) it runs, None when the prior is skipped.
    ``reads``: the manifest column that selects it. ``partial_schedule``: the prior runs
    ``int(prior_num_inference_steps * prior_strength)`` steps. ``alone``: one row per prior call.
    """

    name: str
    pipeline: str | None
    description: str
    reads: str | None = None
    partial_schedule: bool = False
    alone: bool = False


PRIOR_TEXT = PriorKind(name="text", pipeline="KandinskyV22PriorPipeline", description="text prior")
PRIOR_IMAGE = PriorKind(
    name="image",
    pipeline="KandinskyV22PriorEmb2EmbPipeline",
    description="image-guided prior",
    reads="prior_image",
    partial_schedule=True,
)
# diffusers' interpolate takes one weighted list per call (and PriorEmb2Emb's is broken: diffusers #13596).
PRIOR_INTERPOLATE = PriorKind(
    name="interpolate",
    pipeline="KandinskyV22PriorPipeline.interpolate",
    description="interpolating prior",
    reads="interpolate",
    alone=True,
)
# Rows that give `image_embeds` skip the prior: it passes their embeddings on (decoder-only rendering).
PRIOR_EMBEDS = PriorKind(name="embeds", pipeline=None, description="given embeddings", reads="image_embeds")
PRIOR_KINDS: dict[str, PriorKind] = {
    kind.name: kind for kind in (PRIOR_TEXT, PRIOR_IMAGE, PRIOR_INTERPOLATE, PRIOR_EMBEDS)
}


def uses_column(column: str) -> list[str]:
    """Modes whose decoder reads image column ``column``."""
    return [name for name, mode in MODES.items() if column in mode.reads]


def needs_depth(row: dict) -> bool:
    """Whether the depth stage estimates a hint for work ``row`` (a renderable row of a hint-estimating mode)."""
    return row.get("error") is None and MODES[row["mode"]].hint_estimated and row["hint"] is None
