"""syncs.count_syncs counts host waits by call site; the loss path of a step makes none, however
many labels an image carries."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, SourceConfig
from larvess.objective import compute_losses, make_sources
from larvess.syncs import count_syncs

HERE = Path(__file__).resolve().parent


def test_counts_each_kind_of_wait_at_its_line():
    t = torch.arange(6.0)
    with count_syncs(root=HERE) as counts:
        t.sum().item()
        bool(t.any())
        float(t[0])
        t[t > 2]  # boolean mask: a value-dependent shape
        torch.unique(t)
        t[1:3] * 2  # plain slicing and arithmetic: no wait
        torch.repeat_interleave(t, 2)  # an int repeat: the size is known
    assert sum(counts.values()) == 5
    assert all(k.startswith("test_syncs.py:") for k in counts)
    with count_syncs(root=HERE) as after:
        pass
    t.sum().item()  # outside the block: nothing counted, torch restored
    assert sum(after.values()) == 0 and torch.Tensor.item.__name__ == "item"


def _step_inputs(labels_per_image: int):
    C, d, B = 40, 8, 3
    g = torch.Generator().manual_seed(labels_per_image)
    mu = F.normalize(torch.randn(C, d, generator=g), dim=1).requires_grad_()
    xs = [F.normalize(torch.randn(B, d, 4, 4, generator=g), dim=1) for _ in range(2)]
    label = torch.randint(-1, 10, (B, 8, 8), generator=g)
    labels = [10 + torch.randperm(30, generator=g)[:labels_per_image] for _ in range(B)]
    labels[0] = labels[0][:1]  # a single-label image too: the background rule runs
    batches = [{"label": label}, {"labels": labels}]
    cfgs = [
        SourceConfig(name="coco", kind="coco_stuff", root="-", batch_size=B),
        SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=B, cls_weight=0.5,
                     ca_weight=0.5),
    ]  # fmt: skip
    return C, d, mu, xs, batches, cfgs, [torch.arange(10), torch.arange(10, C)]


def test_the_loss_path_never_waits_and_the_push_waits_a_few_times():
    per_case = []
    for n in (1, 6):  # labels per image
        C, d, mu, xs, batches, cfgs, rows = _step_inputs(n)
        lo = LossConfig(k=5, cls_k=4, label_stride=2, margin_weight=0.1)
        srcs = make_sources(cfgs, rows, C, lo)
        ca = CAClassifier(C, d, bank_size=2, topk=3, warm_up=0)
        ca.push(F.normalize(torch.randn(C, d), dim=1), torch.arange(C))
        with count_syncs() as loss_path:
            out = compute_losses(xs, mu, batches, srcs, lo, ca=ca)
            out.terms["total"].backward()
        assert torch.isfinite(out.terms["total"]) and out.terms["ca/in"] > 0
        with count_syncs() as state_phase:
            ca.push(*out.pushes)
        per_case.append((dict(loss_path), sum(state_phase.values())))
    for loss_path, push in per_case:
        assert loss_path == {}, loss_path
        assert 0 < push <= 5
    assert per_case[0][1] == per_case[1][1]  # the same however many labels
