"""This machine's runtime settings (ADAPTFLOW_*): validated with the variable named, applied by runtime(),
and checked by the CLI before any work."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from adaptflow.accel import runtime, settings


def test_defaults_when_unset():
    assert settings({}) == {"device": "auto", "amp": "auto", "channels_last": "auto", "compile": False, "threads": None}


@pytest.mark.parametrize("var,value", [("ADAPTFLOW_DEVICE", "gpu"), ("ADAPTFLOW_DEVICE", "cuda:x"), ("ADAPTFLOW_AMP", "fp8"),
                                       ("ADAPTFLOW_CHANNELS_LAST", "on"), ("ADAPTFLOW_COMPILE", "yes"), ("ADAPTFLOW_THREADS", "0"), ("ADAPTFLOW_THREADS", "two")])
def test_bad_value_names_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        settings({var: value})


def test_runtime_takes_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("ADAPTFLOW_DEVICE", "cpu")
        monkeypatch.setenv("ADAPTFLOW_THREADS", "1")
        monkeypatch.setenv("ADAPTFLOW_AMP", "bf16")
        monkeypatch.setenv("ADAPTFLOW_COMPILE", "1")
        monkeypatch.delenv("ADAPTFLOW_CHANNELS_LAST", raising=False)
        rt = runtime()
        assert rt.device.type == "cpu" and rt.amp_dtype == torch.bfloat16 and rt.compile
        assert torch.get_num_threads() == 1
        assert not runtime(amp="off", compile=False).compile  # an explicit argument wins
        assert rt.channels_last  # auto: on, on CPU too
        monkeypatch.setenv("ADAPTFLOW_CHANNELS_LAST", "0")
        assert not runtime().channels_last and runtime(channels_last=True).channels_last
        with pytest.raises(ValueError, match="channels_last='on'"):
            runtime(channels_last="on")
    finally:
        torch.set_num_threads(before)


def test_cli_fails_before_any_work_on_a_bad_setting(tmp_path, monkeypatch):
    from adaptflow.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTFLOW_THREADS", "many")
    params = __import__("pathlib").Path(__file__).resolve().parents[2] / "params.yaml"
    res = CliRunner().invoke(app, ["stage", "ingest", "--params", str(params)])
    assert res.exit_code == 2
    assert "ADAPTFLOW_THREADS" in res.output
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_replays_a_cuda_graph_with_the_eager_features():
    """cache_features' extractor on CUDA (graph replay for every batch, the short last one padded to the
    full batch) gives the features of the plain eager function, batch by batch."""
    import numpy as np

    from adaptflow.accel import replay_graph
    from adaptflow.models import ModelConfig, create, input_size
    from adaptflow.stages.cache_features import extract

    rt = runtime(device="cuda")
    model = rt.place(create(ModelConfig("resnet10t", 1, 16, [str(i) for i in range(3)]))).eval()
    images = np.random.default_rng(0).integers(0, 256, (70, 1, 16, 16), dtype=np.uint8)
    got = extract(model, images, 32, rt=rt)
    fn = rt.features_fn(model, input_size(model))
    with torch.no_grad(), rt.autocast():
        want = torch.cat([fn(torch.from_numpy(images[i : i + 32]).cuda()).float().cpu() for i in range(0, 70, 32)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    # the replayed graph really is used for a full batch and follows new inputs
    graphed = replay_graph(fn, torch.zeros((32, 1, 16, 16), dtype=torch.uint8, device="cuda"), rt)
    assert graphed is not fn
    x = torch.from_numpy(images[32:64]).cuda()
    with torch.no_grad(), rt.autocast():
        np.testing.assert_allclose(graphed(x).float().cpu().numpy(), want[32:64], rtol=1e-2, atol=1e-2)


def test_extract_in_chunks_keeps_every_row_in_place(monkeypatch):
    """Chunks of several batches (several chunks, a short last chunk and batch) give each image's
    features at its own row: the same as one plain pass over the whole array."""
    import numpy as np

    from adaptflow.models import ModelConfig, create, input_size
    from adaptflow.stages import cache_features

    rt = runtime(device="cpu")
    model = rt.place(create(ModelConfig("resnet10t", 1, 16, [str(i) for i in range(3)]))).eval()
    images = np.random.default_rng(1).integers(0, 256, (23, 1, 16, 16), dtype=np.uint8)
    monkeypatch.setattr(cache_features, "CHUNK_BYTES", 3 * 4 * 16 * 16)  # 3 batches of 4 per chunk
    got = cache_features.extract(model, images, 4, rt=rt)
    with torch.no_grad():
        want = rt.features_fn(model, input_size(model))(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_compiled_extract_sees_one_batch_shape(monkeypatch):
    """A compiled feature function gets full batches only (the short last one padded, its padding's
    features dropped), so it compiles once; the features are the eager ones."""
    import numpy as np

    from adaptflow import accel
    from adaptflow.models import ModelConfig, create, input_size
    from adaptflow.stages import cache_features

    shapes, options = [], []

    def compile(fn, **kw):
        options.append(kw)
        return lambda x: (shapes.append(tuple(x.shape)), fn(x))[1]

    monkeypatch.setattr(accel.torch, "compile", compile)
    rt = runtime(device="cpu", amp="off", compile=True)
    model = rt.place(create(ModelConfig("resnet10t", 1, 16, [str(i) for i in range(3)]))).eval()
    images = np.random.default_rng(2).integers(0, 256, (10, 1, 16, 16), dtype=np.uint8)
    got = cache_features.extract(model, images, 4, rt=rt)
    assert shapes == [(4, 1, 16, 16)] * 3 and options[0]["dynamic"] is False
    with torch.no_grad():
        want = runtime(device="cpu", amp="off").features_fn(model, input_size(model))(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def _uint8_batch(n=4, side=16, channels=3):
    return torch.from_numpy(__import__("numpy").random.default_rng(0).integers(0, 256, (n, channels, side, side), dtype="uint8"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_input_in_float32_is_model_input_exactly(channels_last):
    """Without mixed precision, the runtime's input conversion gives the values of the one shared definition
    (imaging.model_input), whatever the memory format."""
    from adaptflow.accel import Runtime
    from adaptflow.imaging import model_input

    x = _uint8_batch()
    rt = Runtime(torch.device("cpu"), None, channels_last)
    for size in (16, 24, 8):  # as stored, enlarged, shrunk (antialiased)
        out = rt.to_input(x, size)
        assert out.dtype == torch.float32 and out.shape == (4, 3, size, size)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(out, model_input(x, size))


def _amp_input_matches_the_float32_resize(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, ``to_input`` hands the model the AMP dtype (not a float32 batch for the first layer to
    cast) with the values the float32 resize of the same bf16 batch gives, rounded once."""
    from adaptflow.accel import Runtime
    from adaptflow.imaging import normalize, resize

    x = _uint8_batch(side=16).to(device)
    rt = Runtime(torch.device(device), torch.bfloat16, True)
    with rt.autocast():
        out = rt.to_input(x, 56)
    ref = resize(normalize(x).to(torch.bfloat16).float(), 56).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    return out, ref


def test_to_input_under_autocast_hands_over_the_amp_dtype_cpu():
    out, ref = _amp_input_matches_the_float32_resize("cpu")
    # the CPU's bf16 kernel rounds along the way: within one bf16 step (2**-7 just below 1) of the float32 resize
    assert (out.float() - ref.float()).abs().max() <= 2**-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_input_under_autocast_hands_over_the_amp_dtype_cuda():
    out, ref = _amp_input_matches_the_float32_resize("cuda")
    assert torch.equal(out, ref)  # CUDA interpolates in float32 and rounds once: bit for bit


def test_train_processes_need_a_gpu_each_on_cuda(monkeypatch):
    from types import SimpleNamespace

    from adaptflow import accel

    monkeypatch.setattr(accel, "runtime", lambda: SimpleNamespace(cuda=False))
    accel.check_train_processes(4)  # on a CPU the processes split the cores: no limit here
    monkeypatch.setattr(accel, "runtime", lambda: SimpleNamespace(cuda=True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    accel.check_train_processes(2)
    with pytest.raises(ValueError, match="orchestrate.train_processes: 4 processes, one per GPU, but this machine shows 2 GPU"):
        accel.check_train_processes(4)
