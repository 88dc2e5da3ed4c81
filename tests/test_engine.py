"""engine.py: Net's grouped forward and the train loop's phases (a NaN step leaves every saved
state as it was; micro-batches score against the bank of the step's start; lost data counted)."""

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
from larvess.losses import LogitStandardizer
from larvess.model import ClassTable, Segmenter
from larvess.objective import make_sources


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


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


class Acc:
    """The one-process accelerator surface the loop uses; logs kept for the tests."""

    device, is_main_process, num_processes = torch.device("cpu"), True, 1

    def __init__(self):
        self.logged = []

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

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))


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


def _tiny_setup():
    torch.manual_seed(0)
    C, d = 6, 8
    seg = Segmenter("vit_tiny_patch16_224", dim=d, img_size=32,
                    backbone_kwargs=dict(depth=1, embed_dim=48, num_heads=3))  # fmt: skip
    net = Net(seg, ClassTable(C, d))
    cfg = SourceConfig(name="in", kind="imagenet_wds", root="-", batch_size=2, cls_weight=1.0,
                       ca_weight=0.0)  # fmt: skip
    lo = LossConfig(k=4, cls_k=None, margin_weight=0.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return net, make_sources([cfg], [torch.arange(C)], C, lo), lo, opt, sched


def _batches(lost_at: dict[int, tuple[int, list[str]]], n: int):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        lost, shards = lost_at.get(i, (0, []))
        yield {"in": {"image": torch.randn(2, 3, 32, 32, generator=g),
                      "labels": [torch.tensor([1]), torch.tensor([2, 4])],
                      "lost": lost, "lost_shards": shards}}  # fmt: skip


def test_lost_samples_are_counted_logged_and_stop_the_run_above_the_threshold(monkeypatch):
    import larvess.engine as engine
    from larvess.config import TrainConfig

    monkeypatch.setattr(engine, "save_checkpoint", lambda *a, **k: None)
    net, srcs, lo, opt, sched = _tiny_setup()
    acc = Acc()
    lost = {1: (3, ["in-000004.tar"]), 3: (1, ["in-000009.tar"])}
    tc = TrainConfig(log_every=1, max_unreadable=0.5)
    state = engine.train(accelerator=acc, net=net, optimizer=opt, scheduler=sched,
                         batches=_batches(lost, 5), sources=srcs, ca=None, loss=lo, train=tc,
                         steps=5, grad_clip=0.0, run_dir=Path("unused"))  # fmt: skip
    assert state.step == 5 and state.unreadable == 4 and state.samples == 10
    assert state.unreadable_shards == ["in-000004.tar", "in-000009.tar"]
    assert [v["data/unreadable"] for _, v in acc.logged] == [0, 3, 3, 4, 4]
    assert engine.TrainState.from_json(state.to_json()) == state  # trainer_state.json round trip
    # above the threshold: the run stops, naming the shards
    net, srcs, lo, opt, sched = _tiny_setup()
    tc = TrainConfig(log_every=1, max_unreadable=0.2)
    with pytest.raises(engine.TooMuchUnreadable, match=r"3 of 7 samples.*in-000004\.tar"):
        engine.train(accelerator=Acc(), net=net, optimizer=opt, scheduler=sched,
                     batches=_batches(lost, 5), sources=srcs, ca=None, loss=lo, train=tc,
                     steps=5, grad_clip=0.0, run_dir=Path("unused"))  # fmt: skip
