"""HunyuanVideo 1.5 image-to-video behind the `VideoModel` protocol: its own sizes, 4k+1 frames, a guider.

`HunyuanVideo15ImageToVideoPipeline` takes no height or width: it picks the size from the image, the
bucket of its release's resolution (`transformer.config.target_size`: 640 for 480p, 960 for 720p,
sizes of about target² pixels in steps of 16) nearest the image's aspect ratio. The adapter plans
exactly that size and fits the image to it, so the pipeline keeps it. Guidance comes from its
`guider` component (classifier-free guidance, the conditional and unconditional passes one after the
other), and it has no step callback: progress is counted at the scheduler's steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from i2v_daemon.errors import InputError
from i2v_daemon.models.adapter import DiffusersVideoModel
from i2v_daemon.models.base import GenerationRequest, SizePlan
from i2v_daemon.models.sizing import meta_tensor, module_dtype

#: HunyuanVideo 1.5 makes 24 fps motion (Tencent's generate.py writes its 121 frames at 24 fps); it is not told.
NATIVE_FPS = 24
#: SigLIP (so400m, 384 px, 14-pixel patches) image tokens, when the pipeline has no image encoder to ask.
IMAGE_TOKENS = 729


def bucket_for(pipe: Any, width: int, height: int) -> tuple[int, int]:
    """The (width, height) the pipeline makes from an image of this size, and keeps when given an image of
    that size: its nearest bucket, followed to the bucket that maps to itself (the pipeline's ratio rounding
    sends a few extreme buckets to a neighbour)."""
    processor, target = pipe.video_processor, int(pipe.target_size)
    size = (height, width)
    for _ in range(256):
        picked = tuple(int(v) for v in processor.calculate_default_height_width(
            height=size[0], width=size[1], target_size=target))
        if picked == size:
            break
        size = (picked[0], picked[1])
    return size[1], size[0]


def _replay_forward(transformer: Any, hidden: Any, timestep: Any, text: Any, text_mask: Any, text_2: Any,
                    text_2_mask: Any, image: Any) -> Any:
    """`HunyuanVideo15Transformer3DModel.forward` for the planner, on meta tensors: the same modules and shapes,
    without its two data-dependent steps (whether the image embeddings are all zero, and the boolean-mask
    reordering that puts valid text tokens first), which meta tensors cannot take. Same tokens, same memory."""
    batch, _, frames, height, width = hidden.shape
    config = transformer.config
    rotary = transformer.rope(hidden)
    temb = transformer.time_embed(timestep, timestep_r=None)
    hidden = transformer.x_embedder(hidden)
    text = transformer.context_embedder(text, timestep, text_mask)
    text = text + transformer.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
    text_2 = transformer.context_embedder_2(text_2)
    text_2 = text_2 + transformer.cond_type_embed(torch.ones_like(text_2[:, :, 0], dtype=torch.long))
    image = transformer.image_embedder(image)
    image = image + transformer.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    tokens = torch.cat([image, text_2, text], dim=1)
    image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
    mask = torch.cat([image_mask, text_2_mask.bool(), text_mask.bool()], dim=1)
    for block in transformer.transformer_blocks:
        hidden, tokens = block(hidden, tokens, temb, mask, rotary)
    hidden = transformer.proj_out(transformer.norm_out(hidden, temb))
    p_t, p = config.patch_size_t, config.patch_size
    hidden = hidden.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
    return hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class HunyuanVideo15I2VModel(DiffusersVideoModel):
    """`HunyuanVideo15ImageToVideoPipeline` (hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v and 720p_i2v).

    Qwen2.5-VL reads the prompt in its chat template (1000 tokens after the system message), byT5 reads the
    quoted text in it (for lettering), SigLIP the image; the first latent frame is the image's, concatenated
    with a mask to the noise. The released VAE decodes tiled in the model card's example, and here.
    """

    family = "hunyuanvideo-1.5-i2v"
    pipeline_class = "HunyuanVideo15ImageToVideoPipeline"
    pipeline_size_multiple = 16  # its VAE's compression; it makes only its buckets' sizes (bucket_for)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tile_vae()

    def _tile_vae(self) -> None:
        """Decode in spatial tiles, as the model card's example does (`pipe.vae.enable_tiling()`)."""
        self.pipeline.vae.enable_tiling()

    def _reset_savers(self, savers: tuple[str, ...]) -> None:
        super()._reset_savers(savers)
        self._tile_vae()  # the family's own decode, whatever the OOM ladder's rung turned off

    def _limits(self) -> dict[str, Any]:
        pipe = self.pipeline
        step = int(pipe.vae_scale_factor_temporal) * int(pipe.transformer.config.patch_size_t)
        return {
            "size_multiple": int(pipe.vae_scale_factor_spatial) * int(pipe.transformer.config.patch_size),
            "max_prompt_tokens": int(pipe.tokenizer_max_length),
            "frame_step": step,
            "min_frames": step + 1,
            "native_fps": NATIVE_FPS,
        }

    def _resolution(self) -> str:
        target = int(self.pipeline.target_size)
        return f"its {target}×{target}-pixel buckets" + (" (480p)" if target == 640 else " (720p)" if target == 960
                                                        else "")

    def plan_size(
        self, image_size: tuple[int, int], resolution: int, width: int | None, height: int | None
    ) -> SizePlan:
        """The bucket the pipeline makes for this image's shape; an explicit size must be one of its buckets."""
        image_w, image_h = image_size
        if image_w <= 0 or image_h <= 0:
            raise ValueError(f"image size {image_size} must be positive")
        pipe = self.pipeline
        pick = bucket_for(pipe, image_w, image_h)
        notes: list[str] = []
        if width is not None and height is not None:
            if bucket_for(pipe, width, height) != (width, height):
                raise InputError(
                    f"{self.family} makes only the sizes of {self._resolution()}, one for each image shape, which "
                    f"its pipeline picks itself: not {width}×{height}; remove 'width' and 'height', or set them to "
                    f"{pick[0]} and {pick[1]} (this image's size)"
                )
            pick = (width, height)
        elif resolution != min(pick):
            notes.append(f"{self.family} makes the sizes of {self._resolution()}: {pick[0]}×{pick[1]} for this "
                         f"image; resolution {resolution} was not used")
        if not math.isclose(pick[0] / pick[1], image_w / image_h, rel_tol=0.01):
            notes.append(f"the image ({image_w}×{image_h}) will be center-cropped to fit {pick[0]}×{pick[1]}")
        return SizePlan(pick[0], pick[1], tuple(notes))

    def _check_request(self, request: GenerationRequest) -> None:
        super()._check_request(request)
        if bucket_for(self.pipeline, request.width, request.height) != (request.width, request.height):
            raise ValueError(f"{request.width}×{request.height} is not a size {self.family} makes; use plan_size()")

    def _conditioning(self, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
        return {"guidance_scale": request.guidance_scale}, []

    def _call(self, image: Image.Image, request: GenerationRequest, conditioning: dict[str, Any],
              callback: Callable[..., Any] | None) -> Any:
        from i2v_daemon.models.runtime import cpu_generator

        pipe = self.pipeline
        values = dict(conditioning)
        guider, scheduler = pipe.guider, pipe.scheduler
        # The job's scale in the model's own guider for this call (a new guider would log diffusers'
        # "experimental feature" warning in every job); its config keeps the released scale.
        released = guider.guidance_scale
        guider.guidance_scale = float(values.pop("guidance_scale"))
        steps_done = 0
        step = scheduler.step

        def step_and_report(*args: Any, **kwargs: Any) -> Any:  # the pipeline has no callback_on_step_end
            nonlocal steps_done
            out = step(*args, **kwargs)
            steps_done += 1
            if callback is not None:
                callback(pipe, steps_done - 1, None, {})
            return out

        scheduler.step = step_and_report
        try:
            return pipe(
                image=image, prompt=request.prompt, negative_prompt=request.negative_prompt,
                num_frames=request.num_frames, num_inference_steps=request.steps,
                generator=cpu_generator(request.seed), output_type="pt", **values,
            ).frames[0]
        finally:
            del scheduler.step  # the class's own again
            guider.guidance_scale = released

    def _tokenize(self, prompt: str) -> list[int]:
        # What the transformer reads: the chat template with the user's text, less the system message the
        # pipeline cuts off (its first prompt_template_encode_start_idx tokens).
        pipe = self.pipeline
        chat = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt or " "}]
        ids = pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])[int(pipe.prompt_template_encode_start_idx):]

    @staticmethod
    def meta_step(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        transformer = pipe.transformer
        config = transformer.config
        dtype = module_dtype(transformer)
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        # The guider runs the conditional and the unconditional pass one after the other: batch 1. The noise,
        # the image's latents and the mask are concatenated along the channels (in_channels says how many).
        hidden = meta_tensor(1, config.in_channels, frames, h, w, dtype=dtype)
        timestep = meta_tensor(1, dtype=dtype)
        text_tokens, glyph_tokens = int(pipe.tokenizer_max_length), int(pipe.tokenizer_2_max_length)
        text = meta_tensor(1, text_tokens, config.text_embed_dim, dtype=dtype)
        text_2 = meta_tensor(1, glyph_tokens, config.text_embed_2_dim, dtype=dtype)
        encoder = getattr(pipe, "image_encoder", None)
        image_tokens = ((encoder.config.image_size // encoder.config.patch_size) ** 2 if encoder is not None
                        else IMAGE_TOKENS)
        image = meta_tensor(1, image_tokens, config.image_embed_dim, dtype=dtype)
        mask, mask_2 = meta_tensor(1, text_tokens, dtype=dtype), meta_tensor(1, glyph_tokens, dtype=dtype)
        return lambda: _replay_forward(transformer, hidden, timestep, text, mask, text_2, mask_2, image)

    @staticmethod
    def meta_decode(pipe: Any, width: int, height: int, num_frames: int) -> Callable[[], Any]:
        vae = pipe.vae
        frames = (num_frames - 1) // int(pipe.vae_scale_factor_temporal) + 1
        h, w = height // int(pipe.vae_scale_factor_spatial), width // int(pipe.vae_scale_factor_spatial)
        latents = meta_tensor(1, vae.config.latent_channels, frames, h, w, dtype=module_dtype(vae))

        def decode() -> Any:
            tiled = vae.use_tiling
            vae.use_tiling = True  # as HunyuanVideo15I2VModel decodes (_tile_vae)
            try:
                return vae.decode(latents, return_dict=False)
            finally:
                vae.use_tiling = tiled

        return decode
