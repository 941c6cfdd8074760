"""A frozen timm Vision Transformer run with prompts: the body of L2P, DualPrompt, CODA-Prompt and SimpleCIL.

Two ways of putting prompts into the frozen model (``PromptedViT.forward_prompted``):

- **prompt tuning** (L2P, Wang et al. 2022): prompt tokens of width D are inserted into the token sequence after
  the embedding (``[CLS], prompts, patches``; the prompts get no position embedding, they are learned); every
  block then attends over them and transforms them like any other token.
- **prefix tuning** (DualPrompt, Wang et al. 2022; CODA-Prompt, Smith et al. 2023): at chosen layers a prompt is
  a pair (p_k, p_v) of ``length`` tokens each, prepended to that layer's attention keys and values after the
  frozen qkv projection; the sequence length and the other layers are unchanged.

The query of the key-value matching is the frozen model's own [CLS] feature on the image without any prompt
(``query``), computed without gradients. The backbone stays in eval mode and never requires gradients.

With pretrained weights, the frozen model's weights are left out of the module's ``state_dict`` (checkpoints
carry the prompts, keys and head only) and loaded again from their source when a resumed run starts.
Pretrained weights are loaded lazily (``load_pretrained``, called by the methods when a fit or test starts), so a
config with ``pretrained: true`` builds without network (the config tests only instantiate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.nets.pretrained import InputAdapter


def _drop_frozen_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "vit.")]:
        del state_dict[key]


def _allow_missing_frozen_weights(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".vit." not in f".{k}"]


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` without classifier, frozen, with prompt-tuning and prefix-tuning forwards.

    Args:
        name: timm model name (e.g. ``vit_base_patch16_224``, the papers' ViT-B/16).
        pretrained: load timm's pretrained weights for ``name`` when training or testing starts.
        weights: a local weights file instead of the hub (timm's ``pretrained_cfg_overlay=dict(file=...)``);
            implies ``pretrained``.
        input_adapter: optional module applied to the benchmark's images first (resize / renormalise to the
            model's input); an ``InputAdapter`` (``cl_lightning.nets.pretrained``) gets the size and mean/std it
            leaves unset from the model (its built size, timm's pretrained_cfg) and the benchmark's normalisation
            from the method.
        model_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
            ``num_heads``, ``in_chans``, ...; a tiny random ViT for tests).
    """

    def __init__(self, name: str = "vit_base_patch16_224", pretrained: bool = False, weights: str | None = None,
                 input_adapter: nn.Module | None = None, model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        import timm  # the heavy import only where a ViT is built
        from timm.models.vision_transformer import VisionTransformer

        self.name, self.weights = name, weights
        self.pretrained = bool(pretrained or weights)
        self.model_kwargs = dict(model_kwargs or {})
        try:
            vit = timm.create_model(name, pretrained=False, num_classes=0, **self.model_kwargs)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"backbone name={name!r}: {e}") from e
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"backbone name={name!r} is a {type(vit).__name__}, not a timm VisionTransformer")
        if getattr(vit, "num_prefix_tokens", 1) != 1 or vit.cls_token is None:
            raise ValueError(f"backbone name={name!r}: prompting needs exactly one [CLS] token "
                             f"(got num_prefix_tokens={vit.num_prefix_tokens})")
        self.vit: Any = vit  # a timm VisionTransformer (Any: its submodules are read by name)
        self.input_adapter = input_adapter
        if isinstance(input_adapter, InputAdapter):
            cfg: dict[str, Any] = dict(getattr(vit, "pretrained_cfg", None) or {})
            input_adapter.set_target(size=tuple(vit.patch_embed.img_size), mean=cfg.get("mean"), std=cfg.get("std"))
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()
        self.embed_dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        first: Any = vit.blocks[0]
        self.num_heads = int(first.attn.num_heads)
        self.out_features = self.embed_dim
        self.weights_loaded = not self.pretrained
        if self.pretrained:  # the frozen weights come from their source, not from every checkpoint (330 MB for B/16)
            self._register_state_dict_hook(_drop_frozen_weights)
            self.register_load_state_dict_post_hook(_allow_missing_frozen_weights)

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.vit.eval()  # frozen: no dropout / drop-path ever, as in the originals
        return self

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` (in place) on the patch embedding and every block: the methods call the model through
        ``query`` / ``forward_prompted``, not ``forward``, and an unprefixed layer runs its block as a module."""
        self.vit.patch_embed.compile(*args, **kwargs)
        for block in self.vit.blocks:
            block.compile(*args, **kwargs)

    def load_pretrained(self) -> None:
        """Copies timm's pretrained weights for ``name`` (or the local ``weights`` file) into the model, once."""
        if self.weights_loaded:
            return
        import timm

        overlay = {"file": self.weights} if self.weights else None
        try:
            source = timm.create_model(self.name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                                       **self.model_kwargs)
        except Exception as e:  # no network, missing file, ...
            where = f"weights={self.weights!r}" if self.weights else "the hub (pretrained: true)"
            raise RuntimeError(f"backbone {self.name!r}: could not load pretrained weights from {where}: {e}") from e
        self.vit.load_state_dict(source.state_dict())
        self.weights_loaded = True

    def set_input_normalization(self, normalization: tuple[Sequence[float], Sequence[float]] | None,
                                input_shape: Sequence[int] | None = None) -> None:
        """The benchmark's normalisation (from the method's build), passed to an adapter that takes it."""
        hook = getattr(self.input_adapter, "set_input_normalization", None)
        if hook is not None:
            hook(normalization, input_shape)

    # ------------------------------------------------------------------ forwards
    def adapt(self, x: Tensor) -> Tensor:
        return self.input_adapter(x) if self.input_adapter is not None else x

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding + [CLS] + position embedding, as timm's ``forward_features`` before the blocks."""
        v = self.vit
        x = v.patch_embed(self.adapt(x))
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The frozen model's [CLS] feature (after the final norm) on the unprompted image: the matching query."""
        return self.vit.forward_head(self.vit.forward_features(self.adapt(x)), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        """The frozen [CLS] feature (no prompts); with gradients off it equals ``query``."""
        return self.vit.forward_head(self.vit.forward_features(self.adapt(x)), pre_logits=True)

    def forward_prompted(self, x: Tensor, prompt_tokens: Tensor | None = None,
                         prefixes: dict[int, tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """All output tokens (after the final norm) with ``prompt_tokens`` (B, L, D) inserted after [CLS]
        (prompt tuning) and ``prefixes[layer] = (p_k, p_v)``, each (B, L_l, D), prepended to that layer's keys
        and values (prefix tuning)."""
        tokens = self.embed(x)
        if prompt_tokens is not None:
            tokens = torch.cat([tokens[:, :1], prompt_tokens.to(tokens.dtype), tokens[:, 1:]], dim=1)
        prefixes = prefixes or {}
        bad = sorted(set(prefixes) - set(range(self.depth)))
        if bad:
            raise ValueError(f"prefix layers {bad} are outside the backbone's {self.depth} blocks")
        for i, block in enumerate(self.vit.blocks):
            tokens = self._block(block, tokens, prefixes.get(i))
        return self.vit.norm(tokens)

    def _block(self, block: Any, x: Tensor, prefix: tuple[Tensor, Tensor] | None) -> Tensor:
        if prefix is None:
            return block(x)
        x = x + block.drop_path1(block.ls1(self._prefix_attention(block.attn, block.norm1(x), prefix)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    @staticmethod
    def _prefix_attention(attn: Any, x: Tensor, prefix: tuple[Tensor, Tensor]) -> Tensor:
        """timm's ``Attention.forward`` with the prefix keys/values prepended after the frozen qkv projection."""
        B, N, _ = x.shape
        heads, hd = attn.num_heads, attn.head_dim
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        pk, pv = (p.to(x.dtype).reshape(B, p.shape[1], heads, hd).transpose(1, 2) for p in prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, heads * hd)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))
