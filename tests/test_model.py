"""Segmenter, ClassTable, and one backward pass of the full loss through a tiny ViT."""

import pytest
import torch
import torch.nn.functional as F

from larvess.ca_classifier import CAClassifier
from larvess.losses import image_level_ce, knn_sampled_ce, margin_regularizer
from larvess.model import ClassTable, Segmenter, conv_stem, upsample_embeddings

TINY = dict(backbone="vit_tiny_patch16_224", img_size=64, backbone_kwargs=dict(depth=2))


def test_segmenter_shape_and_unit_norm():
    torch.manual_seed(0)
    m = Segmenter(dim=8, **TINY)
    x = m(torch.randn(2, 3, 64, 96))
    assert x.shape == (2, 8, 4, 6) and m.patch_size == 16
    assert torch.allclose(x.norm(dim=1), torch.ones(2, 4, 6), atol=1e-5)
    # prefix (cls) token dropped: the head sees exactly the patch tokens in raster order
    tokens = m.backbone.forward_features(torch.zeros(1, 3, 64, 64))[:, 1:]
    manual = F.normalize(m.head(tokens.transpose(1, 2).reshape(1, -1, 4, 4)), dim=1)
    assert torch.allclose(m(torch.zeros(1, 3, 64, 64)), manual, atol=1e-6)


def test_conv_stem_replaces_the_patch_embedding_at_the_same_stride():
    torch.manual_seed(0)
    m = Segmenter(dim=8, stem="conv", **TINY)
    proj = m.backbone.patch_embed.proj
    strides = [c.stride[0] for c in proj if isinstance(c, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 2, 1] and proj[-1].out_channels == m.backbone.embed_dim
    x = m(torch.randn(2, 3, 64, 96))
    assert x.shape == (2, 8, 4, 6) and m.patch_size == 16
    # the tokens are the stem's output (a 1x1 conv on the last 3x3 feature map), not the old p x p
    img = torch.randn(1, 3, 32, 32)
    tokens = m.backbone.patch_embed(img).reshape(1, 4, -1)  # NHWC under dynamic_img_size
    assert torch.allclose(tokens, proj(img).flatten(2).transpose(1, 2))
    x.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    with pytest.raises(ValueError, match="power-of-two patch size"):
        conv_stem(64, 14)
    with pytest.raises(ValueError, match="'conv'.*'blocks'"):
        Segmenter(dim=8, stem="blocks", **TINY)


def test_upsample_embeddings_is_bilinear_and_renormalised():
    x = F.normalize(torch.randn(1, 5, 3, 3), dim=1)
    up = upsample_embeddings(x, (9, 12))
    ref = F.interpolate(x, size=(9, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(up, ref / ref.norm(dim=1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    src = Segmenter(dim=4, **TINY)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    torch.manual_seed(2)
    m = Segmenter(dim=4, pretrained_file=path, **TINY)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(m.backbone.state_dict()[k], v), k


def test_missing_pretrained_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Segmenter(dim=4, pretrained_file=tmp_path / "nope.safetensors", **TINY)


def test_class_table_normalises():
    init = torch.randn(5, 3) * 4
    t = ClassTable(5, 3, init=init)
    assert torch.allclose(t(), F.normalize(init, dim=1))
    assert torch.allclose(t().norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        ClassTable(5, 4, init=init)


def test_every_parameter_gets_a_finite_nonzero_gradient_from_the_total_loss():
    torch.manual_seed(3)
    C, d, s = 12, 8, 40.0
    model = Segmenter(dim=d, **TINY)
    table = ClassTable(C, d)
    ca = CAClassifier(C, d, bank_size=1, topk=4, warm_up=1)
    seg_img = torch.randn(2, 3, 64, 64)
    seg_lbl = torch.randint(0, 6, (2, 64, 64))
    seg_lbl[:, :8] = -1
    cls_img = torch.randn(2, 3, 64, 64)
    labels = [torch.tensor([6, 7]), torch.tensor([9])]
    with torch.no_grad():  # warm the bank so the CA term is active (the loop's state phase)
        ca.push(*ca.pending(model(cls_img), labels, table()))
    mu = table()
    g = model(seg_img)
    seg = knn_sampled_ce(upsample_embeddings(g, (64, 64)), seg_lbl, mu, 4, s, grid=g)
    x_cls = model(cls_img)
    ca_term = ca.loss(x_cls, labels, mu, s, k=5)
    assert ca_term.item() > 0
    total = (
        seg
        + margin_regularizer(mu, margin=2.0)  # large margin: every row is active
        + 0.1 * image_level_ce(x_cls, labels, mu, s, k=5)
        + 0.1 * ca_term
    )
    total.backward()
    named = list(model.named_parameters()) + list(table.named_parameters())
    for name, p in named:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
