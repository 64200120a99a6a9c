"""What `s2flash precompute` reads, made small: a tiny random DC-AE and Gemma-2 saved as the real
ones are (diffusers / transformers folders), and a folder of captioned images of several sizes."""

from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "a red blue green circle square small big on the left right of user prompt : describe".split()
CAPTIONS = ["a red circle", "big blue square on the left", "green", "small red square right of a big blue circle",
            "a circle"]
SIZES = [(20, 16), (16, 24), (16, 16), (32, 20), (17, 19)]  # (width, height): crops in both directions
RESOLUTION = 16  # the tiny VAE halves: latents 8 x 8 x 4
HIDDEN = 16  # the text encoder's width


def save_tiny_encoders(root: Path) -> tuple[str, str]:
    """(vae folder, text encoder folder) of tiny random models under `root`."""
    import torch
    from diffusers import AutoencoderDC
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                  decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                  decoder_block_out_channels=(8, 16),
                  encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                  decoder_qkv_multiscales=((), ()), scaling_factor=0.41407).save_pretrained(root / "vae")

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(root / "text_encoder")
    config = Gemma2Config(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2,
                          eos_token_id=1)
    Gemma2Model(config).save_pretrained(root / "text_encoder")
    return str(root / "vae"), str(root / "text_encoder")


def write_captioned_images(root: Path) -> Path:
    """Random images img{i}.png with captions img{i}.txt (CAPTIONS, SIZES), and a file that is no image."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (size, caption) in enumerate(zip(SIZES, CAPTIONS)):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption + "\n")
    (root / "notes.md").write_text("not an image")
    return root
