"""A small word-level text encoder: the stand-in for Gemma-2 in the built-in demo.

`FrozenTextEncoder(prompts)` returns what `data.precompute.embed_captions` returns for Gemma:
per-token features [B, L, D] and a 0/1 mask [B, L], the first token a <bos>, real tokens first
and padding after. The weights are random and frozen (nothing trains them): initialised from a
seed so that every machine builds the same encoder, and saved with the tokenizer so that a later
change of the init code cannot change an existing model's embeddings.

Files of a saved encoder: tokenizer.json (the `tokenizers` library's own format; its fixed
padding length is max_length), text_encoder.json (the config), text_encoder.msgpack (weights).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, serialization
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from s2flash_jax.models.layers import dense, layer_norm
from s2flash_jax.outputs import fresh_output_dir
from s2flash_jax.precision import FP32
from s2flash_jax.storage import PathLike, resolve

PAD, BOS = "<pad>", "<bos>"  # ids 0 and 1; the words follow from id 2
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "text_encoder.json"
WEIGHTS_FILE = "text_encoder.msgpack"
NORM_EPS = 1e-6
WORDS_SHOWN = 12  # how many vocabulary words an unknown-word error lists


class WordTokenizer:
    """Lowercased, whitespace/punctuation-split words -> ids, with no unknown-word token: a word
    outside the vocabulary is an error, not a silent <unk>.

    __call__(prompts) -> (ids int32 [B, max_length], mask int32 [B, max_length]); each row is
    <bos>, the prompt's words, then <pad> (id 0, mask 0).
    """

    def __init__(self, tokenizer: Tokenizer):
        padding = tokenizer.padding
        if (tokenizer.token_to_id(PAD) != 0 or tokenizer.token_to_id(BOS) != 1 or not padding
                or padding["length"] is None or tokenizer.normalizer is None or tokenizer.pre_tokenizer is None):
            raise ValueError(f"not a WordTokenizer's tokenizer: expected {PAD} = 0, {BOS} = 1, a normalizer, a "
                             "pre-tokenizer and a fixed padding length (build one with WordTokenizer.from_vocabulary)")
        self.tokenizer = tokenizer
        self.max_length: int = padding["length"]

    @classmethod
    def from_vocabulary(cls, words: Sequence[str], max_length: int) -> WordTokenizer:
        """A tokenizer for `words` (lowercased; each must be one token: letters/digits only, or
        punctuation only). max_length counts the <bos>."""
        if isinstance(words, str):
            raise ValueError("words must be a sequence of words, got one str")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1 (the <bos> takes one token)")
        split = pre_tokenizers.Whitespace()
        lowered = [word.lower() for word in words]
        not_single = [w for w in lowered if [piece for piece, _ in split.pre_tokenize_str(w)] != [w]]
        if not_single:
            raise ValueError(f"vocabulary words {not_single} are not single tokens: a word must be only letters/"
                             "digits/underscores or only punctuation, with no spaces")
        duplicates = sorted({w for w in lowered if lowered.count(w) > 1})
        if duplicates:
            raise ValueError(f"vocabulary words {duplicates} appear more than once (after lowercasing)")
        vocab = {PAD: 0, BOS: 1, **{word: i for i, word in enumerate(lowered, start=2)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))  # an unk absent from vocab: no unk id
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = split
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
        tokenizer.enable_padding(length=max_length, pad_id=0, pad_token=PAD)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids, <pad> and <bos> included."""
        return self.tokenizer.get_vocab_size()

    def _words(self, prompt: str) -> list[str]:
        """The prompt's words as the tokenizer splits them (lowercased, punctuation separate)."""
        return [piece for piece, _ in
                self.tokenizer.pre_tokenizer.pre_tokenize_str(self.tokenizer.normalizer.normalize_str(prompt))]

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, got one str; wrap a single prompt in a list")
        for prompt in prompts:
            self._check(prompt)
        encodings = self.tokenizer.encode_batch(list(prompts))
        shape = (len(encodings), self.max_length)
        ids = np.array([e.ids for e in encodings], np.int32).reshape(shape)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(shape)
        return ids, mask

    def _check(self, prompt: str) -> None:
        words = self._words(prompt)
        unknown = [w for w in dict.fromkeys(words) if self.tokenizer.token_to_id(w) is None]
        if unknown:
            vocabulary = sorted(set(self.tokenizer.get_vocab()) - {PAD, BOS})
            shown = ", ".join(vocabulary[:WORDS_SHOWN]) + (", ..." if len(vocabulary) > WORDS_SHOWN else "")
            raise ValueError(f"prompt {prompt!r} has words outside the vocabulary: {', '.join(map(repr, unknown))}; "
                             f"the vocabulary has {len(vocabulary)} words: {shown}")
        if len(words) + 1 > self.max_length:
            raise ValueError(f"prompt {prompt!r} is {len(words) + 1} tokens (<bos> + {len(words)} words); at most "
                             f"max_length={self.max_length} fit")

    def save(self, directory: PathLike, *, force: bool = False) -> None:
        """Write tokenizer.json into `directory` (replaced only with force=True, and only once written)."""
        with fresh_output_dir(directory, force=force) as staging:
            self.tokenizer.save(str(staging / TOKENIZER_FILE))

    @classmethod
    def load(cls, directory: PathLike) -> WordTokenizer:
        path = resolve(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} has no {TOKENIZER_FILE}; expected a folder written by "
                             "WordTokenizer.save or FrozenTextEncoder.save")
        return cls(Tokenizer.from_str(path.read_text()))


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """vocab_size: the tokenizer's (with <pad> and <bos>); width: the output feature size D;
    max_length: the tokenizer's L; seed: of the frozen random weights."""

    vocab_size: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    max_length: int = 20
    seed: int = 0

    def __post_init__(self):
        problems = [f"{key}={getattr(self, key)} must be >= 1"
                    for key in ("vocab_size", "width", "depth", "num_heads", "max_length")
                    if getattr(self, key) < 1]
        if self.width % self.num_heads or self.width % 2:
            problems.append(f"width={self.width} must be even and divisible by num_heads={self.num_heads}")
        if problems:
            raise ValueError("invalid TextEncoderConfig: " + "; ".join(problems))


def position_sinusoid(length: int, width: int, max_length: int) -> np.ndarray:
    """Fixed position features [cos | sin] for positions 0..length-1: float32 [length, width].

    Frequencies run geometrically from π (neighbouring tokens opposite) down to π/max_length (the
    first and last token opposite): every channel varies within the window and any two positions
    are far apart, so a linear reader can tell all of them apart. (The usual 1/10000 schedule is
    made for thousands of tokens; over 20 it leaves most channels constant and neighbours alike.)
    Computed in float64 on the host (shapes are static).
    """
    half = width // 2
    frequencies = np.pi * (1.0 / max_length) ** (np.arange(half) / max(half - 1, 1))
    angles = np.outer(np.arange(length, dtype=np.float64), frequencies)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def residual_branch_init(depth: int):
    """Init of the projections that write into the residual stream: the 2·depth branches together
    add less variance than the token and position embeddings hold, so those stay the largest part
    of every output (word and position can be read back) while context is mixed in."""
    return nnx.initializers.variance_scaling(0.5 / depth, "fan_in", "normal")


class MaskedSelfAttention(nnx.Module):
    """Softmax self-attention in which only real tokens are keys.

    x: [B, L, D], mask: [B, L] (1 token, 0 padding) -> [B, L, D]
    """

    def __init__(self, width: int, num_heads: int, *, out_init, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.to_qkv = dense(width, 3 * width, ("embed", "heads"), precision=FP32, rngs=rngs)
        self.to_out = dense(width, width, ("heads", "embed"), precision=FP32, rngs=rngs, kernel_init=out_init)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = einops.rearrange(self.to_qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        logits = jnp.einsum("bhnd,bhld->bhnl", q, k) * q.shape[-1] ** -0.5
        # The lowest float, not -inf: padding then gets exactly zero weight, and an all-padding row
        # averages instead of producing NaN.
        logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhnl,bhld->bhnd", jax.nn.softmax(logits, axis=-1), v)
        return self.to_out(einops.rearrange(out, "b h n d -> b n (h d)"))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attention(LN x), then x + MLP(LN x) with a GELU MLP of 4·D.

    x: [B, L, D], mask: [B, L] -> [B, L, D]
    """

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        width, out_init = config.width, residual_branch_init(config.depth)
        self.attention = MaskedSelfAttention(width, config.num_heads, out_init=out_init, rngs=rngs)
        self.mlp_in = dense(width, 4 * width, ("embed", "mlp"), precision=FP32, rngs=rngs)
        self.mlp_out = dense(4 * width, width, ("mlp", "embed"), precision=FP32, rngs=rngs, kernel_init=out_init)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(layer_norm(x, NORM_EPS), mask)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(layer_norm(x, NORM_EPS))))


class TextEncoder(nnx.Module):
    """Token embedding + fixed sinusoidal positions, `depth` pre-LN layers, final LayerNorm.

    ids: int [B, L], mask: [B, L] (1 token, 0 padding) -> float32 [B, L, width], zero at padding.
    """

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        with nnx.use_eager_sharding(False):
            # Unit-variance rows: random vectors in `width` dimensions, so any two words are far apart.
            self.token_embedding = nnx.Embed(
                config.vocab_size, config.width, param_dtype=jnp.float32,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), (None, "embed")), rngs=rngs)
            self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.depth)])

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be [B, L]")
        x = self.token_embedding(ids) + position_sinusoid(ids.shape[1], self.config.width, self.config.max_length)
        for layer in self.layers:
            x = layer(x, mask)
        return jnp.where(mask[..., None] > 0, layer_norm(x, NORM_EPS), 0.0)


class FrozenTextEncoder:
    """prompts -> (embeddings float32 [B, L, width], mask int32 [B, L]): tokenizer + frozen, jitted encoder.

    encoder: weights to use instead of the seeded init of `config` (`load` passes the saved ones).
    As a text encoder of `pipeline.TextToImage`: `tokenize` (host) then `embed(params, ...)` (pure,
    jittable) with `params`, the encoder's state.
    """

    def __init__(self, tokenizer: WordTokenizer, config: TextEncoderConfig, *, encoder: TextEncoder | None = None):
        if (tokenizer.vocab_size, tokenizer.max_length) != (config.vocab_size, config.max_length):
            raise ValueError(f"the tokenizer (vocab_size={tokenizer.vocab_size}, max_length={tokenizer.max_length}) "
                             f"does not fit the config (vocab_size={config.vocab_size}, "
                             f"max_length={config.max_length})")
        self.tokenizer = tokenizer
        self.config = config
        self.encoder = encoder if encoder is not None else TextEncoder(config, rngs=nnx.Rngs(config.seed))
        self._graphdef, self.params = nnx.split(self.encoder)
        self._embed = jax.jit(self.embed)

    @property
    def width(self) -> int:
        """The width of the embeddings."""
        return self.config.width

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """prompts -> (ids, mask) int32 [B, max_length]; ValueError naming a prompt it cannot read."""
        return self.tokenizer(prompts)

    def embed(self, params: nnx.State, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pure: (ids, mask) [B, L] -> (embeddings float32 [B, L, width], mask)."""
        return nnx.merge(self._graphdef, params)(ids, mask), mask

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenize(prompts)
        return np.asarray(self._embed(self.params, ids, mask)[0]), mask

    def save(self, directory: PathLike, *, force: bool = False) -> None:
        """Write tokenizer, config and weights into `directory` (replaced only with force=True, and
        only once everything is written)."""
        weights = serialization.to_bytes(nnx.to_pure_dict(nnx.state(self.encoder)))
        with fresh_output_dir(directory, force=force) as staging:
            self.tokenizer.tokenizer.save(str(staging / TOKENIZER_FILE))
            (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            (staging / WEIGHTS_FILE).write_bytes(weights)

    @classmethod
    def load(cls, directory: PathLike) -> FrozenTextEncoder:
        directory = resolve(directory)
        missing = [name for name in (TOKENIZER_FILE, CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{str(directory)!r} lacks {', '.join(missing)}; expected a folder written by "
                             "FrozenTextEncoder.save")
        config = _read_config(directory / CONFIG_FILE)
        encoder = _restore_weights(config, (directory / WEIGHTS_FILE).read_bytes(), directory / WEIGHTS_FILE)
        return cls(WordTokenizer.load(directory), config, encoder=encoder)


def _read_config(path: epath.Path) -> TextEncoderConfig:
    fields = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, dict) or set(values) - fields or "vocab_size" not in values:
        raise ValueError(f"{path} is not a TextEncoderConfig: expected a JSON object with vocab_size and other keys "
                         f"among {sorted(fields)}")
    return TextEncoderConfig(**values)


def _restore_weights(config: TextEncoderConfig, data: bytes, where: epath.Path) -> TextEncoder:
    """A TextEncoder of `config` holding the msgpack'd weights `data` (checked leaf by leaf)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0))))
    expected = nnx.to_pure_dict(state)
    try:
        saved = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise ValueError(f"{where} is not a msgpack file of weights ({type(e).__name__}: {e})") from None
    try:
        weights = serialization.from_state_dict(expected, saved)
    except ValueError as e:
        raise ValueError(f"{where} does not hold the weights of this config's encoder ({e})") from None
    wrong = [f"{jax.tree_util.keystr(path, simple=True, separator='/')} is {np.shape(w)}, expected {e.shape}"
             for (path, e), w in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(weights))
             if np.shape(w) != e.shape]
    if wrong:
        raise ValueError(f"{where} does not hold the weights of this config's encoder: {'; '.join(wrong[:3])}"
                         + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights))
    return nnx.merge(graphdef, state)
