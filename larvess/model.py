"""Segmenter (timm ViT + embedding head) and the learned class table (ESS).

The segmenter maps images to L2-normalised d-dim pixel embeddings x_p at the patch stride; the
class table holds one row mu_c per vocabulary class. Logits are z_pc = s * x_p . mu_c, computed
by the losses, never here: no layer of the model grows with the number of classes C.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Segmenter", "ClassTable", "upsample_embeddings"]


class Segmenter(nn.Module):
    """timm ViT -> patch tokens -> 1x1 conv to d channels -> L2 norm.

    The head is a single 1x1 convolution (embed_dim -> d, with bias): ESS and LarvSeg both use a
    one-layer classifier on top of the backbone, and the ViT's last block already mixes context,
    so a deeper head would add parameters without a clear gain. The backbone's final LayerNorm
    (applied by timm's ``forward_features``) is kept.

    Args:
        backbone: timm model name (any ViT with ``num_prefix_tokens`` and a patch embedding).
        dim: embedding size d.
        pretrained_file: optional local weights file (.safetensors, .pth/.bin, or the original
            augreg .npz). Loaded through timm's ``pretrained_cfg_overlay=dict(file=...)``; nothing
            is ever downloaded.
        img_size: nominal image size given to timm (the positional embedding grid; other sizes
            work through ``dynamic_img_size=True``).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. depth,
            embed_dim, num_heads for tiny CPU models).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        dim: int = 64,
        pretrained_file: str | os.PathLike | None = None,
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        if pretrained_file is not None:
            path = Path(pretrained_file)
            if not path.is_file():
                raise FileNotFoundError(
                    f"pretrained weights file not found: {str(path)!r} (backbone {backbone!r})"
                )
            # augreg .npz checkpoints need timm's custom loader; .safetensors/.pth of the same
            # models are plain state dicts, so custom_load must be switched off for them.
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        else:
            kwargs.update(pretrained=False)
        self.backbone = timm.create_model(
            backbone, num_classes=0, dynamic_img_size=True, img_size=img_size, **kwargs
        )
        if not hasattr(self.backbone, "num_prefix_tokens") or not hasattr(
            self.backbone, "patch_embed"
        ):
            raise ValueError(f"backbone {backbone!r} is not a ViT with patch tokens")
        patch = self.backbone.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.dim = dim
        self.head = nn.Conv2d(self.backbone.embed_dim, dim, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] -> x [B,d,H/p,W/p], unit norm over channels (H, W floored to p)."""
        B, _, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        tokens = self.backbone.forward_features(images)
        tokens = tokens[:, self.backbone.num_prefix_tokens :]
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"backbone returned {tokens.shape[1]} patch tokens for a {H}x{W} image, "
                f"expected {h}x{w}"
            )
        feat = tokens.transpose(1, 2).reshape(B, -1, h, w)
        return F.normalize(self.head(feat), dim=1)


def upsample_embeddings(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of x [B,d,h,w] to [B,d,H,W], re-normalised to unit length."""
    up = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return F.normalize(up, dim=1)


class ClassTable(nn.Module):
    """Learned class embeddings: ``weight`` [C,d]; ``forward()`` returns mu [C,d] unit rows.

    Rows start at unit length so that the effective step size on mu does not depend on the
    initial norm (the normalisation divides gradients by the row norm).
    """

    def __init__(self, num_classes: int, dim: int, init: Tensor | None = None) -> None:
        super().__init__()
        if init is None:
            if num_classes < 1 or dim < 1:
                raise ValueError(
                    f"ClassTable needs num_classes, dim >= 1, got {num_classes}, {dim}"
                )
            init = F.normalize(torch.randn(num_classes, dim), dim=1)
        elif tuple(init.shape) != (num_classes, dim):
            raise ValueError(
                f"ClassTable init has shape {tuple(init.shape)}, expected ({num_classes}, {dim})"
            )
        self.weight = nn.Parameter(init.detach().clone().float())

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> Tensor:
        """-> mu [C,d], L2-normalised rows."""
        return F.normalize(self.weight, dim=1)
