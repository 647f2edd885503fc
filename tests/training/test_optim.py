"""``model.fused``: which AdamW a run gets, that the fused one trains alike, and clipping with it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from geobp.errors import ConfigError
from geobp.optim import build_adamw, clip_gradients, unscales_in_step, use_fused
from tests.training.test_compile import fit, tiny_task

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_fused_on_cuda_unless_a_loss_scaler_clips():
    assert use_fused(None, CUDA, scaler=False, clipping=True)
    assert use_fused(None, CUDA, scaler=True, clipping=False)
    assert not use_fused(None, CUDA, scaler=True, clipping=True)
    assert not use_fused(None, CPU, scaler=False, clipping=False)
    assert use_fused(True, CPU, scaler=False, clipping=True) and not use_fused(False, CUDA, False, False)
    with pytest.raises(ConfigError, match="model.fused.*16-mixed"):
        use_fused(True, CUDA, scaler=True, clipping=True)


def test_configure_optimizers_builds_the_chosen_adamw():
    fused = tiny_task(fused=True).configure_optimizers()
    plain = tiny_task(fused=False).configure_optimizers()
    assert fused.defaults["fused"] is True and unscales_in_step(fused)
    assert not plain.defaults["fused"] and not unscales_in_step(plain)
    assert not unscales_in_step(tiny_task().configure_optimizers())  # auto on the CPU: not fused


def test_fused_and_unfused_adamw_reach_the_same_weights():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    copy = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    copy.load_state_dict(ref.state_dict())
    start = ref[0].weight.detach().clone()
    opts = [build_adamw([{"params": list(m.parameters())}], 1e-2, 1e-2, fused) for m, fused in ((ref, False), (copy, True))]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        for model, opt in zip((ref, copy), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ref.parameters(), copy.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (ref[0].weight - start).abs().max() > 1e-3  # the weights did move


def test_clip_gradients_by_norm_and_value():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_adamw([{"params": [p]}], 1e-3, 0.0, True)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_gradients(opt, 1.0, "norm")
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0))
    p.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    clip_gradients(opt, 1.0, "value")
    torch.testing.assert_close(p.grad, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    clip_gradients(opt, None, "norm")  # no clipping asked: untouched
    torch.testing.assert_close(p.grad, torch.tensor([1.0, -1.0, 0.5, 0.0]))


def test_fused_adamw_trains_under_bf16_mixed_with_clipping(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; the task clips itself."""
    task = tiny_task(fused=True)
    before = [p.detach().clone() for p in task.parameters()]
    clipped = []
    trainer_kw = dict(precision="bf16-mixed", gradient_clip_val=1e-3)

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            clipped.append(unscales_in_step(optimizer))

    trainer = fit(task, tmp_path, steps=2, callbacks=[Spy()], **trainer_kw)
    assert trainer.global_step == 2 and clipped == [True, True]
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters()))


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
@pytest.mark.slow
def test_resuming_from_the_other_adamw_implementation_keeps_the_chosen_one(tmp_path, monkeypatch, first, then):
    import geobp.nonfinite
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from tests.training.test_compile import batches

    monkeypatch.setattr(geobp.nonfinite, "DEVICE_TYPES", ("cpu",))  # the fused run sets found_inf, as on CUDA
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tiny_task(fused=first), tmp_path / "a", steps=2, callbacks=[ckpt], gradient_clip_val=1.0)
    task = tiny_task(fused=then)
    trainer = L.Trainer(default_root_dir=tmp_path / "b", max_steps=4, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        gradient_clip_val=1.0)
    trainer.fit(task, train_dataloaders=DataLoader(batches(4), batch_size=None), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    opt = trainer.optimizers[0]
    assert trainer.global_step == 4 and bool(opt.param_groups[0]["fused"]) is then
    assert all(int(opt.state[p]["step"]) == 4 for p in task.parameters())
