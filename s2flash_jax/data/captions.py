"""SANA's caption tokenization, shared by the torch precompute and the JAX caption encoder.

One function, `tokenize_captions`, says which tokens the text encoder reads and which of its output
positions SANA keeps, so `data.precompute.embed_captions` (torch Gemma-2) and
`models.gemma2.CaptionEncoder` (JAX Gemma-2) cannot drift apart. The recipe (NVlabs Sana training,
diffusers `SanaPipeline` / `SanaSprintPipeline.encode_prompt`):

  - with a complex human instruction (chi prompt), each prompt is `chi_prompt + caption` and the
    tokenizer's length is len(tokens(chi_prompt)) + caption_length - 2 (the chi prompt's own <bos>,
    and room for the kept token 0: NVlabs' "magic number 2"); without one it is caption_length;
  - right padding to that length, truncation beyond it (a truncated caption warns);
  - keep token 0 (<bos>) and the last caption_length - 1 positions of hidden states and mask.

Not done here (nor in precompute): diffusers' pipelines also lowercase and strip prompts at
sampling time (`_text_preprocessing` with clean_caption=False); NVlabs' training does not.
`diffusers_prompt` is that preprocessing, for sampling (`CaptionEncoder(lowercase=True)`).

The tokenizer is a transformers tokenizer object, or a `FastTokenizer`: the same tokenizer.json
read with the `tokenizers` library alone, because importing transformers imports torch whenever
torch is installed, and sampling in JAX must not need it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

# SANA's complex human instruction (NVlabs/Sana configs `text_encoder.chi_prompt`; diffusers
# SanaPipeline/SanaSprintPipeline `complex_human_instruction`), lines joined with "\n".
SANA_CHI_PROMPT = "\n".join([
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
])
SHOWN_CHARACTERS = 60  # how much of a truncated caption its warning quotes


class CaptionTruncatedWarning(UserWarning):
    """A caption had more tokens than the text encoder reads; its tail was cut off."""


@dataclasses.dataclass(frozen=True)
class CaptionTokens:
    """What the text encoder reads and what SANA keeps of its output.

    input_ids, attention_mask: int64 [B, T] (right padded, T = max_length);
    keep: the caption_length positions of T kept (token 0, then the last caption_length - 1).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    keep: tuple[int, ...]

    @property
    def kept_mask(self) -> np.ndarray:
        """int64 [B, caption_length]: the mask at the kept positions."""
        return self.attention_mask[:, list(self.keep)]


def tokenize_captions(tokenizer: Any, captions: Sequence[str], caption_length: int,
                      chi_prompt: str | None) -> CaptionTokens:
    """captions -> CaptionTokens, as SANA tokenizes them (see the module docstring).

    tokenizer: a transformers tokenizer (e.g. Gemma's, from AutoTokenizer); chi_prompt: None or ""
    for none. Warns (CaptionTruncatedWarning) for each caption cut to fit.
    """
    if isinstance(captions, str):
        raise ValueError("captions must be a sequence of strings, got one str")
    if caption_length < 1:
        raise ValueError(f"caption_length={caption_length} must be >= 1")
    if chi_prompt:
        prompts = [chi_prompt + caption for caption in captions]
        max_length = len(tokenizer.encode(chi_prompt)) + caption_length - 2
        if max_length < caption_length:  # diffusers' negative select_index would run off the front
            raise ValueError(f"the chi prompt {chi_prompt!r} is fewer than 2 tokens with its <bos>; SANA's recipe "
                             "expects an instruction of at least one token")
    else:
        prompts, max_length = list(captions), caption_length
    _warn_truncated(tokenizer, captions, prompts, max_length, caption_length, bool(chi_prompt))
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, padding_side="right", return_tensors="np")
    return CaptionTokens(tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64),
                         kept_positions(max_length, caption_length))


def kept_positions(max_length: int, caption_length: int) -> tuple[int, ...]:
    """The caption_length positions of max_length that SANA keeps: token 0, then the last caption_length - 1."""
    return (0, *range(max_length - caption_length + 1, max_length))


def diffusers_prompt(prompt: str) -> str:
    """A prompt as diffusers' SanaPipeline / SanaSprintPipeline encode it at sampling time
    (`_text_preprocessing(clean_caption=False)`): lowercased, surrounding white space stripped."""
    return prompt.lower().strip()


def _warn_truncated(tokenizer, captions, prompts, max_length, caption_length, with_chi) -> None:
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    for caption, length in zip(captions, lengths):
        if length <= max_length:
            continue
        shown = caption if len(caption) <= SHOWN_CHARACTERS else caption[:SHOWN_CHARACTERS - 3] + "..."
        context = " with the complex human instruction" if with_chi else ""
        warnings.warn(f"caption {shown!r} has {length} tokens{context}, more than the {max_length} the text encoder "
                      f"reads (caption_length={caption_length}); the rest is cut off", CaptionTruncatedWarning,
                      stacklevel=3)


class FastTokenizer:
    """A transformers tokenizer folder read with the `tokenizers` library only (no transformers, no torch).

    Answers the two calls `tokenize_captions` makes as transformers' fast tokenizers answer them:
    `encode(text)` (ids with special tokens) and `__call__(texts, ...)` with optional right/left
    padding to max_length and truncation, returning input_ids and attention_mask. Reads
    tokenizer.json whole (normalizer, pre-tokenizer, model, post-processor) and the pad token from
    tokenizer_config.json; like transformers 5, it ignores that file's add_bos_token/add_eos_token
    when a tokenizer.json exists. (transformers 5 rebuilds a GemmaTokenizer's pipeline in Python
    from the file's vocabulary and merges; tests/test_gemma2.py checks the two agree.)
    """

    def __init__(self, backend: Tokenizer, pad_token: str):
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.backend, self.pad_token, self.pad_token_id = backend, pad_token, pad_id
        backend.no_padding()
        backend.no_truncation()

    @classmethod
    def from_folder(cls, folder: str | Path) -> FastTokenizer:
        """ValueError if the folder has no tokenizer.json or no pad token."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json; expected a transformers (fast) tokenizer folder")
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        pad = (json.loads(config_path.read_text()) if config_path.is_file() else {}).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad = pad or (backend.padding or {}).get("pad_token")
        if pad is None:
            raise ValueError(f"{folder}: tokenizer_config.json names no pad_token")
        return cls(backend, pad)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def __call__(self, texts: Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, add_special_tokens: bool = True, padding_side: str = "right",
                 return_tensors: str | None = None) -> dict[str, Any]:
        if padding not in (False, "max_length") or return_tensors not in (None, "np"):
            raise ValueError(f"FastTokenizer supports padding False/'max_length' and return_tensors None/'np', got "
                             f"{padding!r}, {return_tensors!r}")
        if (padding or truncation) and max_length is None:
            raise ValueError("padding='max_length' and truncation need max_length")
        try:  # what transformers sets on its backend for such a call
            if truncation:
                self.backend.enable_truncation(max_length)
            if padding:
                self.backend.enable_padding(length=max_length, direction=padding_side, pad_id=self.pad_token_id,
                                            pad_token=self.pad_token)
            encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self.backend.no_padding()
            self.backend.no_truncation()
        out = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
        return {k: np.array(v, np.int64) for k, v in out.items()} if return_tensors == "np" else out
