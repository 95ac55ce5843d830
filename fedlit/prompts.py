"""CoOp prompt learner: a learnable context placed among frozen start/class/end token embeddings.

The text of class ``c`` is ``"X X ... X <classname>."`` (``n_ctx`` placeholders). Its token embeddings are computed
once; the start token and everything after the context are kept as frozen buffers, and every forward rebuilds
``[start, ctx, class tokens ...]`` (class position ``end``; ``front`` and ``middle`` are options) and runs the
frozen text tower. Buffers are cut after the last end token when the tower allows it (exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.errors import UserError

PLACEHOLDER = "X"
BOOLEAN_WORDS = ("", "false", "true", "none", "null")  # ctx_init values that are a YAML boolean or null gone wrong


def clean_classname(name: str) -> str:
    """Class name as it appears in prompts: underscores become spaces, surrounding blanks dropped."""
    return name.replace("_", " ").strip()


def _token_count(backbone: Backbone, text: str) -> int:
    """Number of tokens of ``text`` alone (between the start and end tokens)."""
    return int(backbone.tokenize([text]).argmax(dim=-1)[0]) - 1


def check_context_fits(backbone: Backbone, names: list[str], n_ctx: int, ctx_init: str | None = None) -> None:
    """UserError unless the start token, ``n_ctx`` context tokens, the longest class name with its period and the
    end token fit in the tokenizer's context. The tokenizer would silently cut the class name off, and every class
    would get the same prompt."""
    if not names:
        return
    name_tokens = (backbone.tokenize([f"{name}." for name in names]).argmax(dim=-1) - 1).tolist()
    longest = max(range(len(names)), key=lambda i: name_tokens[i])
    room = backbone.context_length - 2 - name_tokens[longest]  # context tokens that fit with the longest name
    if n_ctx <= room:
        return
    name = names[longest]
    if room < 1:
        raise UserError(f"class name {name!r} is too long for the {backbone.context_length}-token context of the "
                        "tokenizer: no room is left for prompt.n_ctx context tokens")
    shown = ctx_init if ctx_init is None or len(ctx_init) <= 40 else ctx_init[:37] + "..."
    what = f"prompt.ctx_init={shown!r} ({n_ctx} tokens)" if ctx_init is not None else f"prompt.n_ctx={n_ctx}"
    fix = "shorten prompt.ctx_init" if ctx_init is not None else f"set prompt.n_ctx <= {room}"
    raise UserError(f"{what} leaves no room for the class name {name!r} ({name_tokens[longest]} tokens with its "
                    f"period) in the {backbone.context_length}-token context of the tokenizer; {fix}")


def init_context(n_ctx: int, width: int, num_classes: int | None, std: float, seed: int | None = None) -> Tensor:
    """Random context ``N(0, std^2)``: ``(n_ctx, W)``, or ``(C, n_ctx, W)`` when ``num_classes`` is given."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (n_ctx, width) if num_classes is None else (num_classes, n_ctx, width)
    return torch.randn(shape, generator=generator) * std


class PromptLearner(nn.Module):
    """Learnable CoOp context for ``C`` classes over a frozen :class:`Backbone`.

    ``ctx``: ``(n_ctx, W)`` (unified) or ``(C, n_ctx, W)`` (class-specific). ``ctx_init`` ("a photo of a") sets the
    context to those words' embeddings and ``n_ctx`` to their token count. ``cut=False`` keeps full 77-token
    sequences (only useful to measure the cut's benefit). ``share_prefix`` runs the positions that all classes share
    (start token and the context before the class name) once per context instead of once per class, when the
    tower is causal and the sequences are cut (exact up to float rounding; ``shared_length`` is that count).
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_position: str = "end",
        init_std: float = 0.02,
        seed: int | None = None,
        cut: bool = True,
        share_prefix: bool = True,
    ):
        super().__init__()
        if ctx_init is not None and not isinstance(ctx_init, str):
            raise UserError(f"prompt.ctx_init must be a string of words or null (got {ctx_init!r})")
        if ctx_init is not None and ctx_init.replace("_", " ").strip().lower() in BOOLEAN_WORDS:
            raise UserError(f"prompt.ctx_init={ctx_init!r} looks like a boolean; use null for random init")
        if not isinstance(class_specific, bool):
            raise UserError(f"prompt.class_specific must be a boolean (got {class_specific!r})")
        if class_position not in ("end", "front", "middle"):
            raise UserError(f"prompt.class_position must be end, front or middle (got '{class_position}')")
        names = [clean_classname(n) for n in classnames]
        num_classes = len(names)
        if ctx_init is not None:
            ctx_init = ctx_init.replace("_", " ").strip()
            n_ctx = _token_count(backbone, ctx_init)
        if n_ctx < 1:
            raise UserError(f"prompt.n_ctx must be >= 1 (got {n_ctx}); set prompt.n_ctx to a positive count")
        check_context_fits(backbone, names, n_ctx, ctx_init)
        self.n_ctx = n_ctx
        self.class_specific = class_specific
        self.class_position = class_position
        self.num_classes = num_classes
        self.classnames = names

        prefix = ctx_init if ctx_init is not None else " ".join([PLACEHOLDER] * n_ctx)
        tokens = backbone.tokenize([f"{prefix} {name}." for name in names])
        eot_index = tokens.argmax(dim=-1)
        length = backbone.sequence_length(eot_index) if cut else backbone.context_length
        embedding = backbone.token_embeddings(tokens[:, :length]).float().cpu()

        if ctx_init is not None:
            words = embedding[0, 1 : 1 + n_ctx].clone()
            ctx = words if not class_specific else words.expand(num_classes, -1, -1).clone()
        else:
            ctx = init_context(n_ctx, backbone.text_width, num_classes if class_specific else None, init_std, seed)
        self.ctx = nn.Parameter(ctx)

        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # (C, 1, W) start token
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # class, '.', end
        self.register_buffer("eot_index", eot_index, persistent=False)
        self.name_lens = [_token_count(backbone, name) for name in names]
        shared = 0 if class_specific else {"end": 1 + n_ctx, "middle": 1 + n_ctx // 2, "front": 1}[class_position]
        self.shared_length = shared if share_prefix and cut and backbone.prefix_shareable and shared > 1 else 0

    @property
    def ctx_shape(self) -> tuple[int, ...]:
        """Shape of one client's context: ``(n_ctx, W)`` or ``(C, n_ctx, W)``."""
        return tuple(self.ctx.shape)

    def build_embeddings(self, ctx: Tensor | None = None) -> Tensor:
        """Prompt embeddings ``(C, L, W)`` for one context, or ``(G, C, L, W)`` for a stack of ``G`` contexts."""
        ctx = self.ctx if ctx is None else ctx
        batched = ctx.dim() == len(self.ctx_shape) + 1
        if not batched:
            ctx = ctx.unsqueeze(0)
        groups = ctx.shape[0]
        if not self.class_specific:
            ctx = ctx.unsqueeze(1).expand(-1, self.num_classes, -1, -1)  # (G, C, n_ctx, W)
        prefix = self.token_prefix.unsqueeze(0).expand(groups, -1, -1, -1).to(ctx.dtype)
        suffix = self.token_suffix.unsqueeze(0).expand(groups, -1, -1, -1).to(ctx.dtype)
        if self.class_position == "end":
            prompts = torch.cat([prefix, ctx, suffix], dim=2)
        else:
            prompts = torch.stack(
                [self._place_class(prefix[:, c], ctx[:, c], suffix[:, c], n) for c, n in enumerate(self.name_lens)],
                dim=1,
            )
        return prompts if batched else prompts[0]

    def _place_class(self, prefix: Tensor, ctx: Tensor, suffix: Tensor, name_len: int) -> Tensor:
        class_tokens, rest = suffix[:, :name_len], suffix[:, name_len:]
        if self.class_position == "front":
            return torch.cat([prefix, class_tokens, ctx, rest], dim=1)
        half = self.n_ctx // 2
        return torch.cat([prefix, ctx[:, :half], class_tokens, ctx[:, half:], rest], dim=1)

    def text_features(self, backbone: Backbone, ctx: Tensor | None = None, deep: Sequence[Tensor] = ()) -> Tensor:
        """Normalised class text features ``(C, D)`` (or ``(G, C, D)`` for stacked contexts).

        ``deep``: deep text prompts (IVLP, MaPLe), ``deep[j] (n_ctx, W)`` (``(G, n_ctx, W)`` with stacked contexts)
        replacing the context positions before text block ``j + 1`` (:func:`fedlit.clip_text.text_tower`); the
        context must sit right after the start token (unified, class at the end)."""
        embeddings = self.build_embeddings(ctx)
        if deep:
            if self.class_specific or self.class_position != "end":
                raise ValueError("deep text prompts replace the context after the start token: they need a unified "
                                 "context with the class at the end")
            batched = embeddings.dim() == 4
            deep = [p.unsqueeze(-3) if batched else p for p in deep]  # (G, 1, n, W) against (G, C, L, W)
            eot = self.eot_index if not batched else self.eot_index.expand(embeddings.shape[0], -1)
            return backbone.encode_prompts(embeddings, eot, deep=deep)
        if self.shared_length:
            stacked = embeddings if embeddings.dim() == 4 else embeddings.unsqueeze(0)
            prefix, suffix = stacked[:, 0, : self.shared_length], stacked[:, :, self.shared_length :]
            features = backbone.encode_shared_prefix(prefix, suffix, self.eot_index)
            return features if embeddings.dim() == 4 else features[0]
        eot = self.eot_index if embeddings.dim() == 3 else self.eot_index.expand(embeddings.shape[0], -1)
        return backbone.encode_prompts(embeddings, eot)
