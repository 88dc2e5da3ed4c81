"""numerics.py: block sizes from the device, the chunked gather-dot against plain autograd."""

import torch

from larvess import numerics


def leaf(t):
    return t.clone().requires_grad_(True)


def _fake_cuda(monkeypatch, free, reserved=0, allocated=0):
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return free, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    return calls


def test_block_elems_is_a_fraction_of_free_cuda_memory(monkeypatch):
    gpu = torch.device("cuda", 0)
    calls = _fake_cuda(monkeypatch, free=8 << 30, reserved=3 << 30, allocated=1 << 30)
    # free counts the allocator's cached-but-unused blocks: 8 + (3 - 1) = 10 GiB
    assert numerics.free_bytes(gpu) == 10 << 30
    assert numerics.block_elems(gpu, 1 << 22, fraction=0.25, elem_bytes=4) == (10 << 30) // 16
    assert numerics.block_elems(gpu, 1 << 22, fraction=0.25, elem_bytes=8) == (10 << 30) // 32
    _fake_cuda(monkeypatch, free=1 << 20)  # almost full device: never below the CPU size
    assert numerics.block_elems(gpu, 1 << 22) == 1 << 22
    _fake_cuda(monkeypatch, free=1 << 45)  # huge: capped at 2**31 - 1 elements
    assert numerics.block_elems(gpu, 1 << 22) == (1 << 31) - 1
    # on the CPU the constant, without asking CUDA anything
    calls.clear()
    assert numerics.block_elems(torch.device("cpu"), 12345) == 12345 and calls == []


def test_gather_dot_matches_autograd_of_plain_gather(monkeypatch):
    monkeypatch.setattr(numerics, "GATHER_ELEMS", 7)  # many chunks
    x = leaf(torch.randn(13, 4, dtype=torch.float64))
    mu = leaf(torch.randn(9, 4, dtype=torch.float64))
    rows = torch.randint(0, 9, (13, 3), generator=torch.Generator().manual_seed(25))
    assert torch.autograd.gradcheck(numerics.gather_dot, (x, mu, rows))
    plain = torch.einsum("nd,nkd->nk", x, mu[rows])
    assert torch.allclose(numerics.gather_dot(x, mu, rows), plain)


# ---- chunk sizes -------------------------------------------------------------------------------
def test_gather_chunks_are_sized_from_the_device(monkeypatch):
    x = torch.empty(10, 64)
    assert numerics.gather_step(x, 10) == numerics.GATHER_ELEMS // 640  # CPU constant
    # c171_i21k: ~2M labelled pixels x (k+1 = 10) x d = 64 is ~1.2K chunks on the CPU size;
    # with 60 GiB free on a GPU one chunk (each of backward's two temporaries <= 1/8 of free)
    monkeypatch.setattr(numerics, "free_bytes", lambda device: 60 << 30)
    step = numerics.gather_step(x, 10)
    assert step == (int(0.125 * (60 << 30)) // 4) // 640 and -(-2_000_000 // step) == 1
