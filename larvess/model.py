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

__all__ = ["Segmenter", "ClassTable", "conv_stem", "upsample_embeddings", "IN21K_HUB"]


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
            is downloaded. A missing file is an error saying where the weights come from.
        pretrained_hub: or a timm hub name of ``backbone``'s architecture with its tag (e.g.
            ``vit_base_patch16_224.augreg_in21k``): timm downloads its weights (online only).
        img_size: nominal image size given to timm (the positional embedding grid; other sizes
            work through ``dynamic_img_size=True``).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. depth,
            embed_dim, num_heads for tiny CPU models).
        stem: "patch" keeps the ViT's patch embedding (one p x p convolution, needed for
            pretrained weights); "conv" replaces it with a stack of 3x3 stride-2 convolutions of
            the same total stride (Xiao et al. 2021, "Early convolutions help transformers see
            better"), for backbones trained from scratch.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        dim: int = 64,
        pretrained_file: str | os.PathLike | None = None,
        img_size: int = 224,
        backbone_kwargs: dict | None = None,
        stem: str = "patch",
        pretrained_hub: str | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        name = backbone
        if pretrained_file is not None and pretrained_hub is not None:
            raise ValueError("Segmenter: give pretrained_file or pretrained_hub, not both")
        if pretrained_hub is not None:
            if pretrained_hub.split(".")[0] != backbone.split(".")[0]:
                raise ValueError(
                    f"pretrained_hub {pretrained_hub!r} is not an architecture of {backbone!r}"
                )
            name = pretrained_hub  # timm resolves the tag to its hub weights and downloads them
            kwargs.update(pretrained=True)
        elif pretrained_file is not None:
            path = Path(pretrained_file)
            if not path.is_file():
                raise FileNotFoundError(missing_weights_message(path, backbone))
            # augreg .npz checkpoints need timm's custom loader; .safetensors/.pth of the same
            # models are plain state dicts, so custom_load must be switched off for them.
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        else:
            kwargs.update(pretrained=False)
        self.backbone = timm.create_model(
            name, num_classes=0, dynamic_img_size=True, img_size=img_size, **kwargs
        )
        if not hasattr(self.backbone, "num_prefix_tokens") or not hasattr(
            self.backbone, "patch_embed"
        ):
            raise ValueError(f"backbone {backbone!r} is not a ViT with patch tokens")
        patch = self.backbone.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if stem == "conv":
            self.backbone.patch_embed.proj = conv_stem(self.backbone.embed_dim, self.patch_size)
        elif stem != "patch":
            raise ValueError(f"model stem must be 'patch' or 'conv', got {stem!r}")
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


IN21K_HUB = "vit_base_patch16_224.augreg_in21k"  # timm hub id of the recipes' ViT-B/16 weights
IN21K_FILE = "weights/vit_base_patch16_224.augreg_in21k.safetensors"  # the recipes' file name
IN21K_NPZ = (  # the original augreg release of the same weights (google-research/vision_transformer)
    "https://storage.googleapis.com/vit_models/augreg/"
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
)


def missing_weights_message(path: Path, backbone: str) -> str:
    """The missing-file error: which file, and where the recipes' ViT-B/16 in21k weights come
    from (README "Weights")."""
    return (
        f"pretrained weights file not found: {str(path)!r} (backbone {backbone!r}). The recipes "
        f"expect ViT-B/16 ImageNet-21K weights (timm {IN21K_HUB}) at {IN21K_FILE}: "
        f"`hf download timm/{IN21K_HUB} model.safetensors --local-dir weights && "
        f"mv weights/model.safetensors {IN21K_FILE}`, or the original augreg .npz {IN21K_NPZ} "
        f"(set model.pretrained_file to it); online, model.pretrained_file=null "
        f"model.pretrained_hub={IN21K_HUB} lets timm fetch them"
    )


def conv_stem(embed_dim: int, patch_size: int) -> nn.Sequential:
    """[B,3,H,W] -> [B,embed_dim,H/p,W/p] by log2(p) 3x3 stride-2 conv-BN-ReLU layers + a 1x1.

    Channels double per layer up to embed_dim (Xiao et al.'s stem), so the stem costs about one
    transformer block.
    """
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(f"conv stem needs a power-of-two patch size >= 2, got {patch_size}")
    widths = [max(embed_dim >> (n - i), 8) for i in range(1, n + 1)]
    layers: list[nn.Module] = []
    c_in = 3
    for c in widths:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                   nn.ReLU(inplace=True)]  # fmt: skip
        c_in = c
    layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
    return nn.Sequential(*layers)


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
