"""FLOPs per image of a checkpoint's decoder (UNet + MoVQ) and prior, counted by torch on the meta device.

torch's ``FlopCounterMode`` counts the matrix work (matmuls, convolutions, attention) of one forward
of each model built from its ``config.json`` on the meta device: no weights, no memory, a few seconds.
For the public Kandinsky 2.2 architectures (`jobs.dev.real_size`) at 768x768: UNet 3.99 TFLOP per
guided step (two 96x96 samples), MoVQ decode 4.89 TFLOP, so 204 TFLOP per image at 50 steps; the
prior transformer 0.33 TFLOP per guided step, 8.2 TFLOP at 25 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.models import movq_scale


@dataclass(frozen=True, kw_only=True)
class ImageFlops:
    """FLOPs of one image: ``unet_step`` per denoising step (both guidance halves), ``movq`` the decode,
    ``prior_step`` per prior step (both halves), for ``steps`` decoder and ``prior_steps`` prior steps."""

    unet_step: float
    movq: float
    prior_step: float
    steps: int
    prior_steps: int

    @property
    def decoder(self) -> float:
        return self.unet_step * self.steps + self.movq

    @property
    def prior(self) -> float:
        return self.prior_step * self.prior_steps


def image_flops(
    models: str, *, height: int, width: int, steps: int, prior_steps: int, guidance: bool = True
) -> ImageFlops:
    """FLOPs of one text2img image with the checkpoints in ``models`` (``decoder/``, ``prior/``)."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel

    configs = {
        "unet": UNet2DConditionModel.load_config(f"{models}/decoder", subfolder="unet"),
        "movq": VQModel.load_config(f"{models}/decoder", subfolder="movq"),
        "prior": PriorTransformer.load_config(f"{models}/prior", subfolder="prior"),
    }
    return flops_of(configs, height=height, width=width, steps=steps, prior_steps=prior_steps, guidance=guidance)


def flops_of(
    configs: dict[str, dict], *, height: int, width: int, steps: int, prior_steps: int, guidance: bool = True
) -> ImageFlops:
    """`image_flops` from architecture configs (``unet``, ``movq``, ``prior``: config.json contents)."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from torch.utils.flop_counter import FlopCounterMode

    def counted(run: object) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"):
            run()
        return float(counter.get_total_flops())

    samples = 2 if guidance else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        movq = VQModel.from_config(configs["movq"])
        prior = PriorTransformer.from_config(configs["prior"])
    scale = movq_scale(movq.config.block_out_channels)
    latent = (-(-height // scale**2) * scale, -(-width // scale**2) * scale)  # text2img rounds up to scale**2
    embeds = int(unet.config.encoder_hid_dim)
    dim, tokens = int(prior.config.embedding_dim), int(prior.config.num_embeddings)

    def unet_step() -> None:
        sample = torch.empty(samples, int(unet.config.in_channels), *latent)
        image_embeds = torch.empty(samples, embeds)
        unet(sample, torch.tensor(500), encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds})

    def decode() -> None:
        movq.decode(torch.empty(1, int(movq.config.latent_channels), *latent), force_not_quantize=True)

    def prior_step() -> None:
        prior(
            torch.empty(samples, dim),
            timestep=torch.tensor(10),
            proj_embedding=torch.empty(samples, dim),
            encoder_hidden_states=torch.empty(samples, tokens, dim),
            attention_mask=torch.ones(samples, tokens, dtype=torch.bool),
        )

    return ImageFlops(
        unet_step=counted(unet_step),
        movq=counted(decode),
        prior_step=counted(prior_step),
        steps=steps,
        prior_steps=prior_steps,
    )
