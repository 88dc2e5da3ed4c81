"""Training end to end on a tiny toy world: two processes, resume, SIGKILL, NaN handling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import ROOT, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from larvess.checkpoint import load_model
from larvess.commands import train
from larvess.data.transforms import MEAN, STD

PY = sys.executable


def load_params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_model(r0: dict, r1: dict) -> None:
    """Every parameter and buffer equal on both ranks, except the conv stem's BatchNorm running
    statistics: DDP broadcasts rank 0's at each forward, then every rank updates them from its
    own batch; rank 0 writes the checkpoint, so only its statistics are ever used."""
    own = ("running_mean", "running_var")
    for k, v in r0["params"].items():
        if not k.endswith(own):
            assert torch.equal(v, r1["params"][k]), k
    assert any(k.endswith(own) for k in r0["params"])  # the toy recipe's stem has BatchNorm


@pytest.mark.slow
def test_two_processes_step_in_lockstep(world, tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    # accelerate's --cpu launcher is single-process (multi-CPU needs MPI); --multi_gpu is its
    # torchrun launcher, and train.py's Accelerator(cpu=True) joins it with gloo.
    launch = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd = launch + [str(ROOT / "tests" / "train_driver.py"), str(out)]
    # global batch 4 per source = 2 per process
    batch = [f"data.{n}.batch_size=4" for n in ("coco", "wa", "imagenet")]
    cmd += tiny(world, tmp_path / "runs", "ddp", 4, "train.ckpt_every=4", *batch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_params(out / "rank0.pt"), load_params(out / "rank1.pt")
    assert r0["step"] == r1["step"] == 4
    for name in ("coco", "wa", "imagenet"):
        k0, k1 = r0["keys"][name], r1["keys"][name]
        assert len(k0) == len(k1) == 4 * 2  # both processes drew one batch per step
        if name != "imagenet":  # map-style: disjoint within the epoch (24 > 16 draws)
            assert not set(k0) & set(k1), name
    # the imagenet stream of each rank reads its own shards
    assert not set(r0["keys"]["imagenet"]) & set(r1["keys"]["imagenet"])
    assert_same_model(r0, r1)
    for k, v in r0["bank"].items():
        assert torch.equal(v, r1["bank"][k]), k
    assert r0["bank"]["count"].sum() > 0  # something was enqueued (and synchronised)
    ckpts = sorted((tmp_path / "runs" / "ddp" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000004"]
    assert (tmp_path / "runs" / "ddp" / "model.pt").is_file()


@pytest.mark.slow
def test_two_machines_of_one_process_each(world, tmp_path):
    """Multi-node as users launch it: one accelerate launch per machine (here both on
    localhost, gloo), global ranks 0 and 1; same result guarantees as one machine."""
    out = tmp_path / "ranks"
    out.mkdir()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    batch = [f"data.{n}.batch_size=4" for n in ("coco", "wa", "imagenet")]
    args = tiny(world, tmp_path / "runs", "nodes", 3, "train.ckpt_every=3", *batch)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        launch = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                  "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
        cmd = launch + [str(ROOT / "tests" / "train_driver.py"), str(out)] + args
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    r0, r1 = load_params(out / "rank0.pt"), load_params(out / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    for name in ("coco", "wa", "imagenet"):  # each global rank draws its own samples
        assert not set(r0["keys"][name]) & set(r1["keys"][name]), name
    assert_same_model(r0, r1)
    for k, v in r0["bank"].items():
        assert torch.equal(v, r1["bank"][k]), k
    # one writer: the main process of machine 0 wrote the run folder (shared disk here)
    assert (tmp_path / "runs" / "nodes" / "model.pt").is_file()
    assert sum("run folder" in log for log in logs) == 1


def test_resume_matches_straight_run(world, tmp_path):
    runs = tmp_path / "runs"
    train.run(tiny(world, runs, "straight", 6, "train.ckpt_every=3", imagenet=False))
    train.run(tiny(world, runs, "split", 6, "train.ckpt_every=3", "train.stop_after=3",
                    imagenet=False))  # fmt: skip
    assert not (runs / "split" / "model.pt").exists()  # stopped half way
    built = train.run(tiny(world, runs, "split", 6, "train.ckpt_every=3", imagenet=False))
    assert built["step"] == 6
    a = load_params(runs / "straight" / "model.pt")
    b = load_params(runs / "split" / "model.pt")
    for part in ("segmenter", "table"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # a run that diverged from the straight one must differ: the comparison can fail
    c = load_params(runs / "straight" / "checkpoints" / "step_00000003" / "model.pt")
    assert not torch.allclose(c["table"]["weight"], a["table"]["weight"])


@pytest.mark.slow
def test_sigkilled_run_resumes_and_finishes(world, tmp_path):
    runs = tmp_path / "runs"
    args = tiny(world, runs, "killed", 40, "train.ckpt_every=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, str(ROOT / "scripts" / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = runs / "killed" / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (runs / "killed" / "model.pt").exists()  # really killed before the end
    done = subprocess.run([PY, str(ROOT / "scripts" / "train.py"), *args, "--resume"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert load_params(runs / "killed" / "model.pt")["step"] == 40
    kept = sorted(p.name for p in (runs / "killed" / "checkpoints").iterdir())
    assert kept == ["step_00000038", "step_00000040"]  # keep_ckpts=2 of the toy recipe


def test_nan_losses_are_skipped_then_abort(world, tmp_path, monkeypatch):
    import larvess.engine as engine

    real = engine.compute_losses
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] in (2, 3):  # two bad steps, then healthy again
            out.terms["total"] = out.terms["total"] * float("nan")
        return out

    monkeypatch.setattr(engine, "compute_losses", poisoned)
    runs = tmp_path / "runs"
    built = train.run(tiny(world, runs, "nan", 5, "train.ckpt_every=5", imagenet=False))
    assert built["step"] == 5 and built["bad_steps"] == 2
    assert (runs / "nan" / "model.pt").is_file()

    def always_nan(*a, **k):
        out = real(*a, **k)
        out.terms["total"] = out.terms["total"] * float("nan")
        return out

    monkeypatch.setattr(engine, "compute_losses", always_nan)
    with pytest.raises(engine.TooManyBadSteps, match="consecutive"):
        train.run(tiny(world, runs, "nan2", 10, "train.max_bad_steps=3", imagenet=False))


def test_pc2_term_trains_on_a_second_view(world, tmp_path, monkeypatch):
    import larvess.engine as engine

    real, seen = engine.compute_losses, []

    def recording(*a, **k):
        out = real(*a, **k)
        seen.append(({n: float(v.detach()) for n, v in out.terms.items()}, k["views"]))
        return out

    monkeypatch.setattr(engine, "compute_losses", recording)
    built = train.run(tiny(world, tmp_path / "runs", "pc2", 2, "loss.pc2_weight=0.5",
                            "loss.pc2_negatives=16", imagenet=False))  # fmt: skip
    assert built["step"] == 2
    terms, views = seen[-1]
    assert terms["pc2/wa"] > 0 and "pc2/coco" not in terms  # image-labelled sources only
    assert views[0] is None and views[1].shape[1] == 8  # the second view's embeddings [B,d,h,w]


def test_backbone_export_loads_in_timm(world, tmp_path):
    """RUN/backbone/ is timm's local-dir format: same features as larvess's backbone, and
    larvess's normalisation and input size in its pretrained_cfg; the run's recipe.yaml records
    the precision used; TensorBoard (accelerate's tracker) reads the scalars in RUN/tb."""
    runs = tmp_path / "runs"
    built = train.run(tiny(world, runs, "patch", 2, "model.stem=patch", imagenet=False))
    assert built["step"] == 2 and built["precision"] == "fp32"  # toy.yaml: precision fp32
    run = runs / "patch"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["precision"] == "fp32"
    assert sorted(p.name for p in (run / "backbone").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    bb = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=True).eval()
    ours = load_model(run).segmenter.backbone
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.forward_features(x)
        torch.testing.assert_close(bb.forward_features(x), want, rtol=0, atol=0)
        # a model with timm's own random init differs: the weights really were loaded
        fresh = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=False).eval()
        assert not torch.allclose(fresh.forward_features(x), want)
    cfg = timm.data.resolve_data_config({}, model=bb)
    assert tuple(cfg["mean"]) == MEAN and tuple(cfg["std"]) == STD
    assert tuple(cfg["input_size"]) == (3, 64, 64)  # model.img_size of the run
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"loss/total", "lr/head"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]  # train.log_every=1


def test_precision_auto_takes_the_launchers_and_cpu_bf16_trains(world, tmp_path):
    """`accelerate launch --mixed_precision bf16` with train.precision=auto: a CPU bf16 run,
    recorded in recipe.yaml; with the toy recipe's explicit fp32 the recipe wins."""
    runs = tmp_path / "runs"
    launch = [PY, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
              "-m", "larvess.commands.train"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny(world, runs, "bf16", 2, "train.precision=auto", imagenet=False)
    proc = subprocess.run(launch + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision bf16" in proc.stdout
    assert (
        yaml.safe_load((runs / "bf16" / "recipe.yaml").read_text())["train"]["precision"] == "bf16"
    )
    params = load_params(runs / "bf16" / "model.pt")["segmenter"]
    floats = [v for v in params.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)  # autocast


def test_bad_recipe_value_is_one_line_without_traceback(tmp_path):
    bad = ["train.precision=fp8", "loss.nope=1", "loss.k=eight"]
    for override in bad:
        code = train.main([str(ROOT / "recipes" / "toy.yaml"), override])
        assert code == 2, override
    proc = subprocess.run([PY, str(ROOT / "scripts" / "train.py"), str(ROOT / "recipes" / "toy.yaml"),
                           "train.precision=fp8"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {ROOT / 'recipes' / 'toy.yaml'}: 'train.precision' = 'fp8' is invalid: "
        "one of auto, bf16, fp16, fp32"
    ], proc.stderr
