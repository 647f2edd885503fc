"""``model.compile``: the compiled forward leaves names, hooks and checkpoints as the plain model's."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import geobp.compiled
from geobp.callbacks.gradflow import GradientFlowMonitor
from geobp.cli import main
from geobp.compiled import CompiledForward, compile_mode, has_hooks
from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError
from geobp.task import SegmentationTask
from tests.conftest import write_tif

PRE = Preprocessing(bands=[1, 2, 3], mean=[100.0] * 3, std=[50.0] * 3, dtype="uint16")


def tiny_task(**kw) -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, preprocessing=PRE.to_dict(),
                            scheduler="none", model_kwargs={"decoder_channels": [16, 8, 8, 8, 8]}, **kw)


def batches(n: int = 4, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(2, 3, size, size, generator=g), "mask": torch.randint(0, 3, (2, size, size), generator=g)}
            for _ in range(n)]


def fit(task: SegmentationTask, root: Path, steps: int = 4, callbacks: list | None = None, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks or [], **trainer_kw)
    trainer.fit(task, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    return trainer


@pytest.fixture
def fast_backend(monkeypatch):
    """aot_eager: dynamo's capture and the autograd split of inductor, without code generation."""
    monkeypatch.setattr(geobp.compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_values_and_unknown_mode():
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default" and compile_mode("max-autotune") == "max-autotune"
    with pytest.raises(ConfigError, match="model.compile.*fast"):
        compile_mode("fast")
    with pytest.raises(ConfigError, match="model.compile"):
        tiny_task(compile="fast")


def test_compiled_task_has_the_plain_models_names_and_state_dict_keys():
    plain, compiled = tiny_task(), tiny_task(compile=True)
    assert isinstance(compiled._compiled, CompiledForward)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in compiled.named_modules()] == [n for n, _ in plain.named_modules()]
    assert not any("_orig_mod" in k for k in compiled.state_dict())


@pytest.mark.slow
def test_a_model_with_hooks_runs_eagerly(fast_backend):
    task = tiny_task(compile=True)
    x = torch.randn(2, 3, 32, 32)
    task(x)
    assert task._compiled.compiled_calls == 1 and task._compiled.eager_calls == 0
    seen = []
    handle = task.model.encoder.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert has_hooks(task.model)
    task(x)
    handle.remove()
    assert seen and task._compiled.eager_calls == 1
    assert not has_hooks(task.model)
    task(x)
    assert task._compiled.compiled_calls == 2


@pytest.mark.slow
def test_compiled_fit_with_monitor_checkpoint_and_infer(tmp_path, fast_backend, capsys):
    task = tiny_task(compile=True, channels_last=True)
    monitor = GradientFlowMonitor(every_n_steps=2, write_report=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(task, tmp_path, steps=4, callbacks=[monitor, ckpt])
    compiled = task._compiled
    # the monitor's recording steps (0 and 2) carried its skip hooks and ran eagerly; the others compiled
    assert compiled.compiled_calls >= 2 and compiled.eager_calls >= 2
    assert monitor.data is not None and len(monitor.data["steps"]) >= 2
    layers = [layer["name"] for layer in monitor.data["layers"]]
    assert any(n.startswith("model.encoder.layer1") for n in layers)
    assert not any("_orig_mod" in n for n in layers)
    assert not has_hooks(task.model)

    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    loaded = SegmentationTask.from_checkpoint(last)
    assert loaded._compiled is None  # inference runs the plain model
    x = torch.randn(1, 3, 32, 32)
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task.model(x.contiguous(memory_format=torch.channels_last)))

    img = tmp_path / "scene.tif"
    write_tif(img, np.random.default_rng(0).integers(1, 300, (3, 40, 48)).astype("uint16"))
    assert main(["infer", "--ckpt", str(last), "--out", str(tmp_path / "pred"), str(img)]) == 0
    out = next((tmp_path / "pred").glob("*.tif"))
    with rasterio.open(out) as src:
        assert src.shape == (40, 48)


@pytest.mark.slow
def test_inductor_forward_and_backward_match_eager():
    """The real path (inductor code generation with the machine's C compiler): same outputs and gradients."""
    torch._dynamo.reset()
    eager, compiled = tiny_task(), tiny_task(compile=True)
    compiled.load_state_dict(eager.state_dict())
    # BatchNorm on running statistics: at this size layer4's batch statistics are over 2 values each,
    # so train-mode gradients amplify rounding differences; eval mode compares the kernels themselves
    eager.eval(), compiled.eval()
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32))
    for task in (eager, compiled):
        task.criterion(task(x), y).backward()
    assert compiled._compiled.compiled_calls == 1
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_model_under_two_process_ddp(tmp_path):
    """DDP over two CPU processes with model.compile: the ranks compile, the monitor's steps run eagerly,
    the gradients are all-reduced (the same weights on both ranks) and rank 0's checkpoint loads."""
    import subprocess

    import yaml

    from geobp.data.synth import write_scenes
    from tests.training.test_ddp import DATA, MODEL, fit_two_processes

    write_scenes(tmp_path / "scenes", scenes=3, size=64, bands=3, classes=3, block_size=32)
    record = tmp_path / "record"
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": False, "default_root_dir": str(tmp_path / "runs"),
                    "callbacks": [{"class_path": "tests.ddp_helpers.CompileCheck", "init_args": {"out": str(record)}}]},
        "model": {**MODEL, "compile": True},
        "data": {"root": str(tmp_path / "scenes"), **DATA, "augment": False},
        "gradflow": {"every_n_steps": 3},
    }
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = fit_two_processes(config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [json.loads((record / f"compile_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["compiled_calls"] > 0 and r["eager_calls"] > 0
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)
    ckpt = next((tmp_path / "runs").rglob("*.ckpt"))
    assert not any("_orig_mod" in k for k in torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    SegmentationTask.from_checkpoint(ckpt)
