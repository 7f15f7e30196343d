"""The compiled recurrence (kernels.py, csrc/recurrence.cpp): the same forward and BPTT as bptt.py's Python loops,
loaded only when built, never compiled by a run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from captioning.models import bptt, kernels

N, T, D, H, Dh, Dw = 3, 5, 4, 6, 2, 3

# `make test` builds the module at install and sets this, so there the comparison cannot skip itself away
REQUIRED = os.environ.get("CAPTIONING_REQUIRE_KERNELS") == "1"


@pytest.fixture
def compiled():
    module = kernels.load()
    if module is None:
        assert not REQUIRED, (f"the compiled recurrence is not built in {kernels.build_directory()}: `make install` "
                              "builds it (python -m captioning.models.kernels)")
        pytest.skip("the compiled recurrence is not built here (python -m captioning.models.kernels)")
    return module


def _inputs(cell: str, dtype: torch.dtype, n: int = N, t: int = T, d: int = D, h: int = H):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, fan_in=1):  # weights scaled as the model initialises them: gates not all saturated
        return (torch.randn(*shape, generator=g, dtype=dtype) / fan_in ** 0.5).requires_grad_(True)

    if cell == "lstm":
        return rand(n, t, d), rand(n, h), rand(d, 4 * h, fan_in=d), rand(h, 4 * h, fan_in=h), rand(4 * h)
    return (rand(n, t, d), rand(n, h, Dh, Dw), rand(d, 4 * h, fan_in=d), rand(h, 4 * h, fan_in=h),
            rand(h, 4 * h, fan_in=h), rand(4 * h))


FORWARDS = {"lstm": bptt.lstm_forward_manual, "attention": bptt.attention_lstm_forward_manual}


def _run(cell, inputs, monkeypatch, module):
    monkeypatch.setattr(kernels, "_loaded", module)
    out = FORWARDS[cell](*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    return out.detach(), grads


@pytest.mark.parametrize("cell", sorted(FORWARDS))
@pytest.mark.parametrize("dtype,size", [(torch.float64, "tiny"), (torch.float32, "tiny"), (torch.float32, "wide")])
def test_the_compiled_loops_compute_what_the_python_loops_do(cell, dtype, size, compiled, monkeypatch):
    # "wide": H = 256, products large enough to go to oneDNN (the tiny ones go to ATen's BLAS)
    shape = dict(n=N, t=T, d=D, h=H) if size == "tiny" else dict(n=64, t=4, d=32, h=256)
    inputs = _inputs(cell, dtype, **shape)
    out_c, grads_c = _run(cell, inputs, monkeypatch, compiled)
    out_p, grads_p = _run(cell, inputs, monkeypatch, None)
    # float32: the same math to rounding (products summed in another order, exp by its own polynomial)
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip((out_c, *grads_c), (out_p, *grads_p), strict=True):
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * float(b.abs().max()))


@pytest.mark.parametrize("cell", sorted(FORWARDS))
@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "torch"), (torch.float64, "torch"), (torch.float32, "onednn")])
def test_steps_shared_between_two_threads_compute_what_one_thread_does(cell, dtype, gemm, compiled, monkeypatch):
    # at two threads a step's product is split into blocks of columns, one per thread, and the cell's rows likewise;
    # 37 rows and 4H = 800 columns leave partial blocks, and the float64 cell takes ATen's ops between the products.
    # With oneDNN's products (its own threads) only the element work is split by rows.
    monkeypatch.setenv("CAPTIONING_GEMM", gemm)
    n, h = 37, 200
    macs = n * h * 4 * h * (2 if cell == "attention" else 1)
    inputs = _inputs(cell, dtype, n=n, t=4, d=16, h=h)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert compiled.splits(macs, False) == (False, False)  # one thread: one call
        torch.set_num_threads(2)
        # (products, rows): ATen's BLAS products are split by columns, oneDNN's are not; small steps not at all
        assert compiled.splits(macs, False) == (True, True)
        assert compiled.splits(macs, True) == (False, True)
        assert compiled.splits(1000, False) == (False, False)
        out_c, grads_c = _run(cell, inputs, monkeypatch, compiled)
    finally:
        torch.set_num_threads(threads)
    out_p, grads_p = _run(cell, inputs, monkeypatch, None)
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip((out_c, *grads_c), (out_p, *grads_p), strict=True):
        torch.testing.assert_close(a, b, rtol=eps, atol=eps * float(b.abs().max()))


@pytest.mark.parametrize("cell", sorted(FORWARDS))
def test_the_compiled_loops_pass_gradcheck(cell, compiled, monkeypatch):
    monkeypatch.setattr(kernels, "_loaded", compiled)
    assert torch.autograd.gradcheck(FORWARDS[cell], _inputs(cell, torch.float64, 2, 3, 3, 4), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


@pytest.mark.parametrize("cell", sorted(FORWARDS))
def test_the_compiled_loops_under_bf16_autocast(cell, compiled, monkeypatch):
    inputs = [t.detach().requires_grad_(True) for t in _inputs(cell, torch.float32, 8, 4, 16, 32)]
    results = {}
    for module in (compiled, None):
        monkeypatch.setattr(kernels, "_loaded", module)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = FORWARDS[cell](*inputs)
        assert out.dtype == torch.bfloat16
        results[module is None] = (out.float(), torch.autograd.grad(out.float().sum(), inputs))
    torch.testing.assert_close(results[False][0], results[True][0], rtol=0.05, atol=0.05)
    for a, b in zip(results[False][1], results[True][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("cell", sorted(FORWARDS))
def test_bf16_steps_run_fused_in_float32_and_are_no_less_exact_than_the_python_loops(cell, compiled, monkeypatch):
    # Under bf16 autocast the compiled loops do a step's element work in one float32 pass over bfloat16 storage
    # (two threads: its rows shared out) instead of bfloat16 ATen ops; both are measured against float64.
    inputs = [t.detach().requires_grad_(True) for t in _inputs(cell, torch.float32, n=37, t=6, d=16, h=200)]
    exact_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    monkeypatch.setattr(kernels, "_loaded", None)
    exact = FORWARDS[cell](*exact_inputs)
    upstream = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact_grads = torch.autograd.grad((exact * upstream).sum(), exact_inputs)

    def errors(module) -> list[float]:
        monkeypatch.setattr(kernels, "_loaded", module)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as profile:
            out = FORWARDS[cell](*inputs)
            grads = torch.autograd.grad((out.double() * upstream).sum(), inputs)
        ops = {event.name for event in profile.events()}
        assert out.dtype == torch.bfloat16 and ("aten::sigmoid_" in ops) == (module is None)
        return [float((a.detach().double() - b).abs().max() / b.abs().max())
                for a, b in zip((out, *grads), (exact.detach(), *exact_grads), strict=True)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fused = errors(compiled)
    finally:
        torch.set_num_threads(threads)
    python_loops = errors(None)
    # bfloat16 keeps 8 bits: ~1% of the largest value here either way; the fused pass rounds less often
    for err_fused, err_python in zip(fused, python_loops, strict=True):
        assert err_fused <= max(1.5 * err_python, 0.01), (fused, python_loops)


def test_a_compiler_without_openmp_still_builds_the_loops(tmp_path, monkeypatch):
    # Apple's clang refuses -fopenmp: the module is built again without it (its steps then run on one thread)
    import torch.utils.cpp_extension as cpp_extension

    flags = []

    def compile_extension(name, sources, build_directory, extra_cflags, verbose, extra_ldflags=()):
        flags.append((list(extra_cflags), list(extra_ldflags)))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    monkeypatch.setenv("CAPTIONING_KERNELS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", compile_extension)
    monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
    assert kernels.build() == kernels.build_directory() / f"{kernels.NAME}.so"
    assert [("-fopenmp" in c, "-fopenmp" in ld) for c, ld in flags] == [(True, True), (False, False)]
    assert all("-fno-trapping-math" in c for c, _ in flags)


def test_a_run_never_compiles_and_an_unbuilt_module_means_the_python_loops(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_KERNELS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
    tic = time.perf_counter()
    assert kernels.load() is None  # nothing built there: no compiler started
    assert time.perf_counter() - tic < 5
    assert not any(tmp_path.iterdir())
    x, h0, Wx, Wh, b = _inputs("lstm", torch.float64)
    assert bptt.lstm_forward_manual(x, h0, Wx, Wh, b).shape == (N, T, H)  # the Python loops
    monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
    monkeypatch.setenv("CAPTIONING_KERNELS", "off")
    monkeypatch.delenv("CAPTIONING_KERNELS_DIR")
    assert kernels.load() is None


def test_the_build_folder_is_keyed_by_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_KERNELS_DIR", str(tmp_path))
    before = kernels.build_directory()
    assert before.parent == tmp_path
    edited = tmp_path / "recurrence.cpp"
    edited.write_bytes(kernels.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(kernels, "SOURCE", edited)
    assert kernels.build_directory() != before  # an old build is not loaded for a new source


def test_a_failed_build_says_what_to_do_and_training_goes_on(monkeypatch, capsys):
    def fail(verbose=False):
        raise OSError("g++: command not found")

    monkeypatch.setattr(kernels, "build", fail)
    assert kernels.main([]) == 1
    err = capsys.readouterr().err
    assert "g++: command not found" in err and "python -m captioning.models.kernels" in err
    assert "without it" in err


def test_a_build_that_does_not_load_is_a_warning_naming_it_and_the_python_loops_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_KERNELS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_loaded", kernels._UNSET)
    folder = kernels.build_directory()
    folder.mkdir(parents=True)
    (folder / f"{kernels.NAME}.so").write_bytes(b"not a shared library")
    with pytest.warns(RuntimeWarning, match="does not load") as record:
        assert kernels.load() is None
    message = str(record[0].message)
    assert str(folder) in message and "python -m captioning.models.kernels" in message
    x, h0, Wx, Wh, b = _inputs("lstm", torch.float64)
    assert bptt.lstm_forward_manual(x, h0, Wx, Wh, b).shape == (N, T, H)


def test_bfloat16_products_leave_onednn_where_the_cpu_has_no_bf16_linear(monkeypatch):
    # oneDNN builds no bf16 linear on AVX2-only CPUs ("could not create a primitive descriptor"): there the products
    # go to torch's own kernels, in the Python loops and in the compiled ones alike
    from captioning.models import gemm

    monkeypatch.setattr(gemm, "_BF16", False)
    assert not gemm.onednn_dtype(torch.bfloat16) and gemm.onednn_dtype(torch.float32)
    assert not bptt._onednn(torch.zeros(2, dtype=torch.bfloat16))
    a, b = torch.randn(64, 512), torch.randn(512, 256)
    expected = (a.bfloat16().float() @ b.bfloat16().float())
    torch.testing.assert_close(gemm.mm(a.bfloat16(), b.bfloat16()).float(), expected, rtol=0.02, atol=0.5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch built without oneDNN")
def test_products_go_to_onednn_only_where_it_beats_torchs_blas(monkeypatch):
    # on an x86 CPU without AVX-512 MKL was faster at every product of the model; with AVX-512 oneDNN up to 2x
    from captioning.models import gemm

    monkeypatch.delenv("CAPTIONING_GEMM", raising=False)
    for capability, expected in (("AVX2", False), ("AVX512", True)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda capability=capability: capability)
        assert gemm.onednn_available() is expected
        a, b = torch.randn(64, 256), torch.randn(256, 1024)
        torch.testing.assert_close(gemm.mm(a, b), a @ b, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("CAPTIONING_GEMM", "torch")
    assert not gemm.onednn_available()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("CAPTIONING_GEMM", "onednn")
    assert gemm.onednn_available()
