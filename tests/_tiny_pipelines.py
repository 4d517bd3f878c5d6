"""Tiny diffusers pipelines built from configs alone (nothing downloaded), saved with `save_pretrained`:
text encoders and tokenizers included, so `from_pretrained` on the folder is the same code path as a real
checkpoint. Tokenizers get a vocabulary of a few words; models get random weights from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cocodiff.apps import families

WORDS = "a the red cat lighthouse at dusk on mat photo of sea moon blurry".split()


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(WORDS)))
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge each word left to right into one token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    chars = sorted(set("".join(WORDS)))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip(tokenizer, *, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tokenizer, *, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),  # VAE factor 2: sizes in multiples of 4 px (FLUX packs 2x2 latents)
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.06,
        scaling_factor=0.9,
    ).eval()


def build_pipeline(family: str, *, seed: int = 0):
    """A tiny text-to-image pipeline of `family` ("flux" or "sd3") with 4 attention heads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    if family == "flux":
        from diffusers import FluxPipeline

        # the families' tiny FLUX.1 with one block of each kind
        transformer = families.build_model("flux", "tiny", seed=seed, num_layers=1, num_single_layers=1)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(2),
            text_encoder=_clip(clip_tok, hidden=16, projection=False),
            tokenizer=clip_tok,
            text_encoder_2=_t5(t5_tok, d_model=16),
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=16,
            caption_projection_dim=32,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
        ).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4),
            text_encoder=_clip(clip_tok, hidden=8, projection=True),
            tokenizer=clip_tok,
            text_encoder_2=_clip(clip_tok, hidden=8, projection=True),
            tokenizer_2=clip_tok,
            text_encoder_3=_t5(t5_tok, d_model=16),
            tokenizer_3=t5_tok,
        )
    raise ValueError(f"no tiny pipeline for {family!r}")


def save_pipeline(family: str, path: str | Path) -> Path:
    """Build the tiny pipeline and `save_pretrained` it to `path`."""
    path = Path(path)
    build_pipeline(family).save_pretrained(path)
    return path
