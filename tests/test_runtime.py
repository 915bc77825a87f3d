"""Runtime policy: device choice, the AMP dtype of each ``--amp`` choice, autocast on and off, atomic
writes that never leave a half-written file, and the allocator setting."""
from __future__ import annotations

import os
import stat
import sys

import pytest
import torch

from fcnseg import runtime
from fcnseg.errors import OptionError
from fcnseg.runtime import (
    atomic_write,
    autocast_context,
    current_umask,
    keep_freed_memory,
    resolve_amp_dtype,
    select_device,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# --- select_device ---------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_accelerators(no_accelerator):
    assert select_device("auto") == CPU
    assert select_device(None) == CPU
    assert select_device() == CPU


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == MPS


def test_explicit_devices_pass_through(no_accelerator):
    assert select_device("cpu") == CPU
    assert select_device(torch.device("cpu")) == CPU


@pytest.mark.parametrize("name", ["cuda", "cuda:1", torch.device("cuda:0")])
def test_cuda_without_cuda_is_a_clear_error(no_accelerator, name):
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu or auto"):
        select_device(name)


def test_mps_without_mps_is_a_clear_error(no_accelerator):
    with pytest.raises(ValueError, match="MPS is not available"):
        select_device("mps")


@pytest.mark.parametrize("name,message", [("cuda", "'cuda' requested but CUDA is not available; use --device cpu or auto"),
                                          ("cuda:1", "CUDA is not available"), ("mps", "MPS is not available"),
                                          ("gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps")])
def test_an_unavailable_or_unknown_device_is_a_usage_error(no_accelerator, name, message):
    """OptionError: every command reports it as a usage error (exit status 2); still a ValueError."""
    with pytest.raises(OptionError, match=message):
        select_device(name)
    assert issubclass(OptionError, ValueError)


def test_a_real_auto_choice_is_a_device_that_works():
    device = select_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert device.type == expected
    assert torch.ones(2, device=device).sum().item() == 2


# --- resolve_amp_dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CPU, CUDA, MPS])
def test_explicit_amp_choices(device):
    assert resolve_amp_dtype("none", device) is None
    assert resolve_amp_dtype("bf16", device) is torch.bfloat16
    assert resolve_amp_dtype("fp16", device) is torch.float16


def test_an_unknown_amp_choice_is_a_usage_error():
    for bad in ("fast", "fp32", "BF16", ""):
        with pytest.raises(OptionError, match=f"unknown amp choice {bad!r}; choose one of auto, bf16, fp16, none"):
            resolve_amp_dtype(bad, CPU)


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: native)
    assert resolve_amp_dtype("auto", CPU) is expected
    assert resolve_amp_dtype("none", CPU) is None  # "none" wins on any CPU
    assert resolve_amp_dtype("bf16", CPU) is torch.bfloat16  # forcing works on any CPU


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_amp_dtype("auto", CUDA) is expected


def test_auto_elsewhere_is_off():
    assert resolve_amp_dtype("auto", MPS) is None


def test_native_cpu_bf16_is_a_bool():
    assert isinstance(runtime.native_cpu_bf16(), bool)


def test_cpu_flags_are_read_on_linux():
    flags = runtime.cpu_flags()
    assert isinstance(flags, frozenset)
    if sys.platform.startswith("linux") and runtime.platform.machine() == "x86_64":
        assert {"sse2", "fpu"} <= flags  # every x86-64 CPU has them


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", {"avx2", "fma"}, True),                # AVX2 without VNNI: int8 pairs overflow 16 bits
    ("x86_64", {"avx2", "avx512f"}, True),            # AVX-512 without VNNI as well
    ("x86_64", {"avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("AMD64", set(), True),                           # flags unknown (not Linux): the safe choice
    ("aarch64", set(), False),                        # ARM's dot products accumulate in 32 bits
])
def test_int8_needs_reduced_range_on_x86_without_vnni(monkeypatch, machine, flags, expected):
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.int8_needs_reduced_range() is expected


# --- autocast_context ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_autocast_off_is_a_no_op(dtype):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_context(CPU, dtype):
        assert not torch.is_autocast_enabled("cpu")
        product = a @ b
    assert product.dtype == torch.float32
    torch.testing.assert_close(product, a @ b, rtol=0, atol=0)


def test_autocast_on_computes_in_the_dtype():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_context(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        product = a @ b
    assert product.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(product.float(), a @ b, rtol=0.05, atol=0.1)


# --- atomic_write ----------------------------------------------------------------------------------


def _others(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name != name)


def test_atomic_write_writes_the_content(tmp_path):
    path = atomic_write(tmp_path / "a" / "b" / "file.bin", lambda f: f.write(b"hello"))
    assert path == tmp_path / "a" / "b" / "file.bin"
    assert path.read_bytes() == b"hello"
    atomic_write(str(path), lambda f: f.write(b"second"))  # replaces; str paths work too
    assert path.read_bytes() == b"second"
    assert _others(path.parent, "file.bin") == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "file.bin"
    path.write_bytes(b"previous content")

    def writer(f):
        f.write(b"half of the new cont")
        f.flush()
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, writer)
    assert path.read_bytes() == b"previous content"
    assert _others(tmp_path, "file.bin") == []


def test_a_failing_first_write_creates_nothing(tmp_path):
    def writer(f):
        f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "new.bin", writer)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def umask():
    """Sets the process umask for a test, and puts the previous one back."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.skipif(sys.platform == "win32", reason="Unix permissions")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    """Like any file the user creates (mkstemp alone would leave checkpoints and ONNX files 0600)."""
    umask(mask)
    assert current_umask() == mask
    path = atomic_write(tmp_path / "file.bin", lambda f: f.write(b"x"))
    assert stat.S_IMODE(path.stat().st_mode) == mode
    (tmp_path / "plain.txt").write_text("x")  # the reference: what open() gives under this umask
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


# --- keep_freed_memory -----------------------------------------------------------------------------


def test_keep_freed_memory_returns_a_bool_and_is_idempotent():
    first = keep_freed_memory()
    assert isinstance(first, bool)
    assert keep_freed_memory() is first
    assert keep_freed_memory() is first
    assert torch.ones(3_000_000).sum().item() == 3_000_000  # large allocations still work
