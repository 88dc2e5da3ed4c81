"""objective.compute_losses: per-source negatives and the per-source loss combination, against
the same terms written out by hand; label subsampling; the margin search cache; Net's grouped
forward. The train loop's phases: test_train.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from larvess.build import param_groups
from larvess.ca_classifier import CAClassifier
from larvess.config import LossConfig, OptimConfig, SourceConfig
from larvess.engine import Net
from larvess.losses import LogitStandardizer, image_level_ce, margin_regularizer, nearest_rows
from larvess.model import ClassTable, Segmenter
from larvess.objective import (
    compute_losses,
    local_index,
    make_sources,
    source_shares,
    subsample_labels,
)

S = 40.0


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


def setup():
    C, d = 30, 6
    mu = unit(C, d, seed=0).requires_grad_()
    x_mask = unit(2, d, 4, 4, seed=1)
    x_img = unit(2, d, 4, 4, seed=2)
    mask_rows = torch.arange(0, 10)  # a COCO-like source: rows 0..9
    img_rows = torch.tensor([3, 4] + list(range(10, 30)))  # ImageNet-like: 2 shared rows + 20
    label = torch.randint(0, 10, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    label[0, 0, :2] = -1
    batches = [{"label": label}, {"labels": [torch.tensor([12]), torch.tensor([3, 20])]}]
    sources = [
        SourceConfig(name="coco", kind="coco_stuff", root="-", batch_size=6),
        SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=2, cls_weight=0.5,
                     ca_weight=0.0),
    ]  # fmt: skip
    return mu, [x_mask, x_img], batches, sources, [mask_rows, img_rows]


def test_source_shares():
    _, _, _, sources, _ = setup()
    assert source_shares(sources, "batch_mean") == [0.75, 0.25]
    assert source_shares(sources, "sum") == [1.0, 1.0]


def test_local_index_maps_rows_into_the_source_label_space():
    rows = torch.tensor([7, 2, 9])
    index = local_index(rows, 10)
    assert index[torch.tensor([[9, -1], [7, 2]])].tolist() == [[2, -1], [0, 1]]
    assert index[[0, 1, 3]].tolist() == [-1, -1, -1]  # rows outside the source


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (5, 3)])
def test_subsample_labels_takes_each_cells_centre_pixel(stride, size):
    H, W = size
    label = torch.randint(-1, 50, (2, H, W), generator=torch.Generator().manual_seed(stride))
    got = subsample_labels(label, stride)
    o = stride // 2
    rows = [i * stride + o for i in range(H) if i * stride + o < H]
    cols = [j * stride + o for j in range(W) if j * stride + o < W]
    assert got.shape == (2, len(rows), len(cols))
    assert len(rows) == -(-(H - o) // stride) and len(cols) == -(-(W - o) // stride)
    for b in range(2):
        for a, i in enumerate(rows):
            for c, j in enumerate(cols):
                assert got[b, a, c] == label[b, i, j]


@pytest.mark.parametrize("negatives", ["source", "all"])
@pytest.mark.parametrize("combine", ["batch_mean", "sum"])
def test_compute_losses_equals_the_terms_by_hand(negatives, combine):
    mu, xs, batches, sources, rows = setup()
    # k >= every source's class count - 1: the kNN-sampled CE is the full softmax over the
    # candidates, so the reference can be written without any search
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.5, margin=1.5, negatives=negatives,
                    combine=combine)  # fmt: skip
    terms = compute_losses(xs, mu, batches, make_sources(sources, rows, 30, lo), lo).terms
    share = [0.75, 0.25] if combine == "batch_mean" else [1.0, 1.0]
    cand = rows if negatives == "source" else [torch.arange(30)] * 2
    # pixel CE: softmax over the source's rows only
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    local = local_index(cand[0], 30)[y[keep]]
    seg = F.cross_entropy(S * x[keep] @ mu[cand[0]].T, local)
    # image-level CE: pooled embedding against the source's rows, other labels excluded
    want_cls = 0.0
    pairs = [(0, 12, []), (1, 3, [20]), (1, 20, [3])]
    pooled = xs[1].mean(dim=(2, 3))
    for b, t, other in pairs:
        allowed = [r for r in cand[1].tolist() if r not in other]
        z = S * pooled[b] @ mu[allowed].T
        want_cls = want_cls - F.log_softmax(z, dim=0)[allowed.index(t)]
    want_cls = want_cls / len(pairs)
    want = share[0] * seg + share[1] * 0.5 * want_cls + 0.5 * margin_regularizer(mu, 1.5)
    assert torch.allclose(terms["total"], want, atol=1e-5)
    assert torch.allclose(terms["seg/coco"], share[0] * seg, atol=1e-5)
    # gradients: with source negatives, no COCO pixel pushes an ImageNet-only row
    mu.grad = None
    terms["seg/coco"].backward()
    touched = mu.grad.abs().sum(dim=1) > 0
    assert touched[:10].any()
    assert touched[10:].any() == (negatives == "all")
    # image_level_ce itself agrees on local labels
    local_labels = [local_index(cand[1], 30)[L] for L in batches[1]["labels"]]
    got = image_level_ce(xs[1], local_labels, mu[cand[1]], S)
    assert torch.allclose(got, want_cls, atol=1e-5)


def test_margin_with_cached_neighbours_equals_a_fresh_search():
    mu = unit(50, 4, seed=5).requires_grad_()
    fresh = margin_regularizer(mu, 0.8)
    cached = margin_regularizer(mu, 0.8, nearest=nearest_rows(mu))
    assert torch.allclose(fresh, cached) and fresh > 0
    # a stale neighbour list still scores the current rows' distances
    stale = torch.roll(nearest_rows(mu), 1)
    naive = F.relu(0.8 - (mu - mu[stale]).norm(dim=1)).mean()
    assert torch.allclose(margin_regularizer(mu, 0.8, nearest=stale), naive)


def test_logit_norm_standardises_the_pixel_logits_over_the_source_rows():
    """LarvSeg's _mask_norm: each pixel's logits over its source's classes standardised
    (population variance), then gamma * z + beta; the CE follows, written out by hand here."""
    mu, xs, batches, sources, rows = setup()
    norm = LogitStandardizer()
    with torch.no_grad():
        norm.gamma.fill_(3.0)
        norm.beta.fill_(0.5)
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.0, negatives="source", combine="sum")
    srcs = make_sources(sources, rows, 30, lo)
    got = compute_losses(xs, mu, batches, srcs, lo, logit_norm=norm).terms["seg/coco"]
    x = xs[0].permute(0, 2, 3, 1).reshape(-1, 6)
    y = batches[0]["label"].reshape(-1)
    keep = y >= 0
    z = S * x[keep] @ mu[rows[0]].T
    z = (z - z.mean(dim=1, keepdim=True)) / torch.sqrt(z.var(dim=1, unbiased=False)[:, None] + 1e-5)
    want = F.cross_entropy(3.0 * z + 0.5, y[keep])  # COCO rows 0..9 are their own local ids
    assert torch.allclose(got, want, atol=1e-4)
    got.backward()
    assert norm.gamma.grad is not None and norm.gamma.grad.abs() > 0


def test_logit_norm_parameters_are_trained_without_decay():
    seg = Segmenter("vit_tiny_patch16_224", dim=8, img_size=32,
                    backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3))  # fmt: skip
    norm = LogitStandardizer()
    groups = param_groups(seg, ClassTable(5, 8), OptimConfig(weight_decay=0.05), norm)
    (group,) = [g for g in groups if g["name"] == "logit_norm"]
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 2
    assert all(
        g["name"] != "logit_norm" for g in param_groups(seg, ClassTable(5, 8), OptimConfig())
    )


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_net_groups_sources_of_one_size_into_one_forward_with_the_same_result(stem):
    torch.manual_seed(0)
    seg = Segmenter("vit_tiny_patch16_224", dim=8, img_size=64, stem=stem,
                    backbone_kwargs=dict(depth=2, embed_dim=32, num_heads=2))  # fmt: skip
    net = Net(seg, ClassTable(5, 8)).eval()  # eval: BatchNorm uses its running statistics
    g = torch.Generator().manual_seed(1)
    sizes = [(3, 64), (2, 32), (2, 64), (1, 32)]  # two crop sizes, interleaved
    images = [torch.randn(b, 3, s, s, generator=g, requires_grad=True) for b, s in sizes]
    calls = []
    seg.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    xs, mu = net(images)
    assert sorted(calls) == [3, 5]  # one backbone call per crop size
    assert [tuple(x.shape) for x in xs] == [(b, 8, s // 16, s // 16) for b, s in sizes]
    weights = [torch.randn(x.shape, generator=g) for x in xs]
    sum((w * x).sum() for w, x in zip(weights, xs)).backward()
    grads = [im.grad.clone() for im in images]
    for im, x, w, gr in zip(images, xs, weights, grads):
        im.grad = None
        ref = seg(im)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)
        (w * ref).sum().backward()
        torch.testing.assert_close(gr, im.grad, atol=1e-5, rtol=1e-4)
    assert mu.shape == (5, 8) and torch.allclose(mu.norm(dim=1), torch.ones(5))  # unit rows


@pytest.mark.parametrize("negatives", ["source", "all"])
def test_compute_losses_leaves_the_bank_alone_and_returns_its_pushes(negatives):
    mu, xs, batches, sources, rows = setup()
    sources[1].ca_weight = 0.5
    lo = LossConfig(k=40, cls_k=None, margin_weight=0.0, negatives=negatives)
    srcs = make_sources(sources, rows, 30, lo)
    ca = CAClassifier(30, 6, bank_size=1, topk=2)
    for c in range(30):  # every ring warm
        ca.push(unit(1, 6, seed=100 + c), torch.tensor([c]))
    before = {k: v.clone() for k, v in ca.state_dict().items()}
    out = compute_losses(xs, mu, batches, srcs, lo, ca=ca)
    for k, v in ca.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out.terms["ca/in"] > 0
    # the pushes: one slot per (image, label) pair, in vocabulary rows
    slots, classes = out.pushes
    assert classes.tolist() == [12, 3, 20]
    local = [srcs[1].index[L] for L in batches[1]["labels"]]
    want = ca.pending(xs[1], local, mu[srcs[1].rows], rows=srcs[1].rows)
    assert torch.allclose(slots, want[0]) and torch.equal(classes, want[1])
    # and the CA term is the CA loss on the source's rows, weighted by share x ca_weight
    ref = ca.loss(xs[1], local, mu[srcs[1].rows], S, rows=srcs[1].rows)
    assert torch.allclose(out.terms["ca/in"], srcs[1].share * 0.5 * ref)


# ---- the train loop's phases -------------------------------------------------------------------
def _checkpoint_state(folder):
    """Everything a checkpoint restores, as tensors by name: weights, optimiser, schedule and
    the CA bank (accelerate's files), not the RNG states or the step counters."""
    import pickle

    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.iterdir()):
        if f.name.endswith(".safetensors"):
            out.update({f"{f.name}/{k}": v for k, v in load_file(f).items()})
        elif f.name in ("optimizer.bin", "scheduler.bin") or f.name.startswith("custom_"):
            try:
                obj = torch.load(f, map_location="cpu", weights_only=False)
            except (pickle.UnpicklingError, RuntimeError):
                obj = pickle.loads(f.read_bytes())
            out.update({f"{f.name}/{k}": v for k, v in _flatten(obj).items()})
    return out


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(obj, list | tuple):
        return {
            k2: v2 for i, v in enumerate(obj) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()
        }
    return {prefix: obj}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def test_a_nan_step_is_counted_once_and_leaves_every_saved_state_as_it_was(
    world, tmp_path, monkeypatch
):
    from larvess.checkpoint import read_state
    from larvess.commands import train

    runs = tmp_path / "runs"
    args = ["train.ckpt_every=1", "train.keep_ckpts=10"]
    train.run(tiny(world, runs, "nan", 3, *args, "train.stop_after=3", imagenet=False))
    ckpts = runs / "nan" / "checkpoints"
    before = _checkpoint_state(ckpts / "step_00000003")
    assert any(k.startswith("custom_") and "bank" in k for k in before)  # the CA bank is saved
    assert any(k.endswith("running_mean") for k in before)  # and the stem's BatchNorm statistics
    # the next forward returns NaN once: step 4 is skipped, step 5 trains again
    real, calls = Segmenter.forward, {"n": 0}

    def once_nan(self, images):
        calls["n"] += 1
        x = real(self, images)
        return x * float("nan") if calls["n"] == 1 else x

    monkeypatch.setattr(Segmenter, "forward", once_nan)
    built = train.run(tiny(world, runs, "nan", 5, *args, "train.stop_after=1", imagenet=False))
    assert built["step"] == 4 and built["bad_steps"] == 1
    after = _checkpoint_state(ckpts / "step_00000004")
    assert before.keys() == after.keys()
    changed = [k for k in before if not _same(before[k], after[k])]
    assert changed == [], changed
    for k, v in after.items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert torch.isfinite(v).all(), k
    assert read_state(ckpts / "step_00000004")["bad_steps"] == 1
    # a healthy step changes them again, and the count stays one
    built = train.run(tiny(world, runs, "nan", 5, *args, imagenet=False))
    assert built["step"] == 5 and built["bad_steps"] == 1
    moved = _checkpoint_state(ckpts / "step_00000005")
    assert any(not _same(after[k], moved[k]) for k in after if "bank" in k)
    assert any(not _same(after[k], moved[k]) for k in after if k.startswith("model"))


def test_micro_batches_score_against_the_bank_of_the_steps_start(monkeypatch):
    """grad_accum = 2: the second micro-batch sees the bank as the step began; the step pushes
    both micro-batches' slots after the optimiser step, in order."""
    import larvess.engine as engine
    from larvess.config import TrainConfig

    C, d = 12, 8
    torch.manual_seed(0)
    seg = Segmenter("vit_tiny_patch16_224", dim=d, img_size=32,
                    backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3))  # fmt: skip
    net = Net(seg, ClassTable(C, d))
    cfg = SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=2, ca_weight=1.0)
    lo = LossConfig(k=4, cls_k=None, margin_weight=0.0)
    srcs = make_sources([cfg], [torch.arange(C)], C, lo)
    ca = CAClassifier(C, d, bank_size=4, topk=2, warm_up=0)
    for c in range(C):
        ca.push(unit(1, d, seed=50 + c), torch.tensor([c]))
    g = torch.Generator().manual_seed(3)
    micro = [{"in": {"image": torch.randn(2, 3, 32, 32, generator=g),
                     "labels": [torch.tensor([1, 5]), torch.tensor([5])]}} for _ in range(2)]  # fmt: skip
    banks, real = [], engine.compute_losses

    def recording(*a, **k):
        banks.append(k["ca"].bank.clone())
        return real(*a, **k)

    monkeypatch.setattr(engine, "compute_losses", recording)
    start = ca.state_dict()
    start = {k: v.clone() for k, v in start.items()}

    class Acc:  # the one-process accelerator surface the loop uses
        device, is_main_process, num_processes = torch.device("cpu"), True, 1

        def unwrap_model(self, m):
            return m

        def no_sync(self, m):
            return contextlib.nullcontext()

        def autocast(self):
            return contextlib.nullcontext()

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, params, max_norm):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)

        def reduce(self, t, reduction):
            return t

        def log(self, *a, **k):
            pass

    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the two forwards see one model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(engine, "save_checkpoint", lambda *a, **k: None)
    engine.train(accelerator=Acc(), net=net, optimizer=opt, scheduler=sched, batches=iter(micro),
                 sources=srcs, ca=ca, loss=lo, train=TrainConfig(grad_accum=2, log_every=1),
                 steps=1, grad_clip=0.0, run_dir=Path("unused"))  # fmt: skip
    assert len(banks) == 2 and torch.equal(banks[0], start["bank"])
    assert torch.equal(banks[1], start["bank"])  # the first micro-batch pushed nothing yet
    # after the step: both micro-batches' pairs (3 each), in order
    assert ca.count.tolist() == [1 + 2 if c == 1 else 1 + 4 if c == 5 else 1 for c in range(C)]
    ref = CAClassifier(C, d, bank_size=4, topk=2, warm_up=0)
    ref.load_state_dict(start)
    net.eval()  # same weights (lr 0); pending is computed from the same embeddings
    for mb in micro:
        b = mb["in"]
        with torch.no_grad():
            (x,), mu = net([b["image"]])
        ref.push(*ref.pending(x, b["labels"], mu))
    assert torch.allclose(ca.bank, ref.bank, atol=1e-6)
