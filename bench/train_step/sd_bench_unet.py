"""The small SD-topology UNet and diffusion batch that the PyTorch baselines of arbor's training
benchmarks share (bench/train_step/train_step.py, bench/ddp/ddp_step.py): diffusers'
UNet2DConditionModel from arbor's fixture config with libtorch's scaled_dot_product_attention
(the kernel arbor uses), SD1's DDPM noise schedule, and the epsilon MSE loss."""

import json

import torch


def build_unet(config_path):
    """diffusers' UNet2DConditionModel from the config json, in train mode, with SDPA attention.
    Seed torch before calling it for reproducible weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    with open(config_path) as handle:
        config = json.load(handle)
    unet = UNet2DConditionModel.from_config(config).train()
    unet.set_attn_processor(AttnProcessor2_0())
    return unet, config


def sd1_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def random_batch(config, batch, height, width, context_len, seed, device="cpu"):
    """(latents, noise, context, timesteps) for one micro-batch of height x width latents, from a
    CPU generator seeded `seed`, moved to `device`."""
    generator = torch.Generator().manual_seed(seed)
    channels = config.get("in_channels", 4)
    latents = torch.randn(batch, channels, height, width, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    context = torch.randn(batch, context_len, config["cross_attention_dim"], generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    return tuple(tensor.to(device) for tensor in (latents, noise, context, timesteps))


def diffusion_loss(unet, scheduler, latents, noise, context, timesteps):
    """Noise the latents at the timesteps, predict the noise, return the MSE (epsilon target)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, context).sample
    return torch.nn.functional.mse_loss(prediction, noise, reduction="mean")
