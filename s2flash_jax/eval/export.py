"""Benchmark prompt sets read from local files, and generated images written in the layouts their
official (PyTorch) evaluators read. Nothing is downloaded: the user points at the files.

Prompt sets (`read_prompt_set`):
  file     a text file, one prompt per line (blank lines skipped), as `s2flash sample --prompts-file`.
  geneval  GenEval's `prompts/evaluation_metadata.jsonl` (github.com/djghosh13/geneval): one JSON
           object per line with "prompt", "tag" and "include" (a list of {"class", "count", and
           optionally "color" / "position"}), "exclude" optional; 553 prompts.
  mjhq     MJHQ-30K's `meta_data.json` (huggingface.co/datasets/playgroundai/MJHQ-30K): one JSON
           object {image id: {"prompt": ..., "category": ...}}, 30,000 entries in 10 categories.

Export layouts (`Exporter`, one folder per prompt set and sampling setting):
  geneval  <dir>/<prompt index:05d>/metadata.jsonl   the prompt's line of evaluation_metadata.jsonl
           <dir>/<prompt index:05d>/samples/<k:04d>.png   k = 0 .. images per prompt − 1 (4 in GenEval)
           as GenEval's README and generation/diffusers_generate.py write it and
           evaluation/evaluate_images.py reads it (numeric folder names; every `\\d+\\.png` under samples/).
  mjhq     <dir>/<category>/<image id>.png (`<image id>_<k:02d>.png` with several images per prompt),
           mirroring mjhq30k_imgs/<category>/<image id>.jpg, so overall FID (clean-fid's recursive
           folder scan) and per-category FID (pytorch-fid on <dir>/<category>) line up with the
           reference images; plus <dir>/meta_data.json with the prompts that were generated.
  file     <dir>/<index:05d>.png (`<index:05d>_<k:02d>.png`) and <dir>/metadata.jsonl with
           {"file_name", "text"} lines (Hugging Face's imagefolder layout, which `s2flash precompute`
           also reads).
Every PNG carries its prompt and sampling settings in its text chunks, as `s2flash sample` writes them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s2flash_jax.pipeline import PromptError, save_png

FILE, GENEVAL, MJHQ = "file", "geneval", "mjhq"
PROMPT_SETS = (FILE, GENEVAL, MJHQ)
DEFAULT_IMAGES_PER_PROMPT = {FILE: 1, GENEVAL: 4, MJHQ: 1}
EXPECTED_FILES = {
    FILE: "a text file with one prompt per line",
    GENEVAL: "GenEval's evaluation_metadata.jsonl (one JSON object per line with prompt, tag and include)",
    MJHQ: "MJHQ-30K's meta_data.json ({image id: {\"prompt\": ..., \"category\": ...}})",
}
_SAFE_NAME = re.compile(r"^[\w.-]+$")


class PromptSetError(PromptError):
    """A prompt set file that cannot be read; the message names the file, the line and what was expected."""


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One prompt of a set. metadata: GenEval's JSON line (kept whole for the export); key / category:
    MJHQ's image id and category."""

    prompt: str
    metadata: Mapping[str, Any] | None = None
    key: str | None = None
    category: str | None = None


def read_prompt_set(kind: str, path: str | Path | None) -> list[PromptEntry]:
    """The prompts of `path` read as prompt set `kind` (one of PROMPT_SETS)."""
    if kind not in PROMPT_SETS:
        raise PromptSetError(f"--prompts {kind!r} is not one of {', '.join(PROMPT_SETS)}")
    if path is None:
        raise PromptSetError(f"--prompts {kind} needs --prompts-path: {EXPECTED_FILES[kind]} (nothing is downloaded)")
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"--prompts-path {str(path)!r} does not exist; expected {EXPECTED_FILES[kind]}")
    text = path.read_text(encoding="utf-8")
    entries = {FILE: _read_lines, GENEVAL: _read_geneval, MJHQ: _read_mjhq}[kind](text, path)
    if not entries:
        raise PromptSetError(f"{path} holds no prompts; expected {EXPECTED_FILES[kind]}")
    return entries


def _read_lines(text: str, path: Path) -> list[PromptEntry]:
    return [PromptEntry(line.strip()) for line in text.splitlines() if line.strip()]


def _read_geneval(text: str, path: Path) -> list[PromptEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path} line {number} is not JSON ({e}); expected {EXPECTED_FILES[GENEVAL]}") from None
        problem = _geneval_problem(entry)
        if problem:
            raise PromptSetError(f"{path} line {number}: {problem}; expected {EXPECTED_FILES[GENEVAL]}")
        entries.append(PromptEntry(entry["prompt"], metadata=entry))
    return entries


def _geneval_problem(entry: Any) -> str | None:
    """What is wrong with one GenEval metadata object, as evaluate_images.py would trip on it (None if fine)."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not a JSON object"
    if not isinstance(entry.get("prompt"), str) or not isinstance(entry.get("tag"), str):
        return "no string 'prompt' and 'tag'"
    for clause in ("include", "exclude"):
        items = entry.get(clause, [])
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("class"), str) and isinstance(i.get("count"), int)
                for i in items):
            return f"'{clause}' is not a list of {{'class': str, 'count': int, ...}}"
    if "include" not in entry:
        return "no 'include' list"
    return None


def _read_mjhq(text: str, path: Path) -> list[PromptEntry]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{path} is not JSON ({e}); expected {EXPECTED_FILES[MJHQ]}") from None
    if not isinstance(meta, dict):
        raise PromptSetError(f"{path} holds a {type(meta).__name__}; expected {EXPECTED_FILES[MJHQ]}")
    entries = []
    for key, value in meta.items():
        if not (isinstance(value, dict) and isinstance(value.get("prompt"), str)
                and isinstance(value.get("category"), str)):
            raise PromptSetError(f"{path}: entry {key!r} has no string 'prompt' and 'category'; expected "
                                 f"{EXPECTED_FILES[MJHQ]}")
        if not _SAFE_NAME.match(key) or not _SAFE_NAME.match(value["category"]):
            raise PromptSetError(f"{path}: entry {key!r} (category {value['category']!r}) cannot be a file name")
        entries.append(PromptEntry(value["prompt"], key=key, category=value["category"]))
    return entries


def subset(entries: Sequence[PromptEntry], limit: int | None) -> list[PromptEntry]:
    """`limit` entries evenly spaced through the set (all of them without a limit): a quick run still
    spans every GenEval task and MJHQ category, which both files list grouped."""
    if limit is None or limit >= len(entries):
        return list(entries)
    if limit < 1:
        raise PromptSetError(f"--limit {limit} must be >= 1")
    return [entries[i] for i in np.linspace(0, len(entries) - 1, limit).round().astype(int)]


class Exporter:
    """Writes one sampling setting's images into `root` in prompt set `kind`'s layout (see the module
    docstring); call `add` for each chunk of images and `finish` once at the end."""

    def __init__(self, kind: str, root: Path, entries: Sequence[PromptEntry], images_per_prompt: int,
                 settings: Mapping[str, Any]):
        self.kind, self.root, self.entries = kind, Path(root), list(entries)
        self.images_per_prompt, self.settings = images_per_prompt, dict(settings)
        self.root.mkdir(parents=True, exist_ok=True)
        self._file_lines: list[str] = []

    def path(self, prompt_index: int, sample: int) -> Path:
        """Where image `sample` of prompt `prompt_index` goes."""
        entry, several = self.entries[prompt_index], self.images_per_prompt > 1
        if self.kind == GENEVAL:
            return self.root / f"{prompt_index:05d}" / "samples" / f"{sample:04d}.png"
        if self.kind == MJHQ:
            return self.root / entry.category / (f"{entry.key}_{sample:02d}.png" if several else f"{entry.key}.png")
        return self.root / (f"{prompt_index:05d}_{sample:02d}.png" if several else f"{prompt_index:05d}.png")

    def add(self, images: np.ndarray, first_image: int) -> None:
        """images [n, H, W, 3] in [0, 1]: images first_image .. first_image + n − 1 of the run, prompt-major
        (image i is sample i % images_per_prompt of prompt i // images_per_prompt)."""
        for offset, image in enumerate(images):
            prompt_index, sample = divmod(first_image + offset, self.images_per_prompt)
            entry, path = self.entries[prompt_index], self.path(prompt_index, sample)
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.kind == GENEVAL and sample == 0:
                (path.parent.parent / "metadata.jsonl").write_text(json.dumps(dict(entry.metadata)) + "\n")
            if self.kind == FILE:
                self._file_lines.append(json.dumps({"file_name": path.name, "text": entry.prompt}))
            save_png(image, path, entry.prompt, {**self.settings, "index": prompt_index, "sample": sample})

    def finish(self) -> None:
        if self.kind == MJHQ:
            meta = {e.key: {"prompt": e.prompt, "category": e.category} for e in self.entries}
            (self.root / "meta_data.json").write_text(json.dumps(meta, indent=1) + "\n")
        elif self.kind == FILE:
            (self.root / "metadata.jsonl").write_text("".join(line + "\n" for line in self._file_lines))
