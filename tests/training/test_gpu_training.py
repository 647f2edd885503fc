"""On a CUDA device: the fused AdamW by default under bf16-mixed with clipping, and ``model.compile``
with inductor, the gradient-flow monitor and a checkpoint (run by ``scripts/gpu_bench.sh``)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from geobp.callbacks.gradflow import GradientFlowMonitor
from geobp.optim import unscales_in_step
from geobp.task import SegmentationTask
from tests.training.test_compile import batches, tiny_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def fit_cuda(task: SegmentationTask, root, steps: int, callbacks: list):
    import lightning as L
    from torch.utils.data import DataLoader

    trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cuda", devices=1, precision="bf16-mixed",
                        gradient_clip_val=1.0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(task, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    return trainer


def test_auto_fused_adamw_on_cuda_with_bf16_mixed_and_clipping(tmp_path):
    task = tiny_task()  # fused: auto
    before = [p.detach().clone() for p in task.parameters()]
    trainer = fit_cuda(task, tmp_path, 3, [])
    assert unscales_in_step(trainer.optimizers[0]) and trainer.global_step == 3
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, task.parameters()))


def test_inductor_compile_on_cuda_with_monitor_and_checkpoint(tmp_path):
    torch._dynamo.reset()
    task = tiny_task(compile=True, channels_last=True)
    monitor = GradientFlowMonitor(every_n_steps=2, write_report=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit_cuda(task, tmp_path, 4, [monitor, ckpt])
    assert task._compiled.compiled_calls >= 2 and task._compiled.eager_calls >= 2
    assert len(monitor.data["steps"]) >= 2 and any(n.startswith("model.encoder") for n in
                                                    (layer["name"] for layer in monitor.data["layers"]))
    loaded = SegmentationTask.from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cuda")
    x = torch.randn(2, 3, 32, 32, device="cuda")
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task.model(x), rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()


def test_nonfinite_skip_is_decided_on_the_device(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    task = tiny_task()  # fused: auto, so fused on CUDA; bf16-mixed has no loss scaler
    data = batches(4)
    data[2]["image"] = data[2]["image"].clone()
    data[2]["image"][0, 0, 0, 0] = float("nan")
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.nonfinite_protocol.device_skip is not None)

    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cuda", devices=1, precision="bf16-mixed",
                        gradient_clip_val=1.0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[Spy()])
    with pytest.warns(UserWarning, match="not finite on 1 step"):
        trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=None))
    assert seen == [True] * 4 and task.nonfinite_steps == 1
    opt = trainer.optimizers[0]
    assert all(int(opt.state[p]["step"]) == 3 for p in task.parameters() if p in opt.state)
    assert all(torch.isfinite(p).all() for p in task.parameters())
