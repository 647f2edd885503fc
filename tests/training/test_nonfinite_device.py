"""``nonfinite: skip`` decided on the device (geobp.nonfinite), run on the CPU: it trains exactly as the
host check does, without the host check."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import geobp.nonfinite
from geobp.nonfinite import DeviceSkip, applies
from geobp.optim import build_adamw
from tests.training.test_compile import batches, tiny_task

CPU = torch.device("cpu")


def poisoned(bad: tuple[int, ...]) -> list[dict]:
    out = batches(5)
    for i in bad:
        out[i]["image"] = out[i]["image"].clone()
        out[i]["image"][0, 0, 0, 0] = float("nan")
    return out


def train(tmp_path, device_path: bool, bad: tuple[int, ...], monkeypatch,
          accumulate: int = 1) -> tuple[torch.nn.Module, list, L.Trainer]:
    if device_path:
        monkeypatch.setattr(geobp.nonfinite, "DEVICE_TYPES", ("cpu",))
    else:
        monkeypatch.setattr(geobp.nonfinite, "DEVICE_TYPES", ())
    task = tiny_task(fused=True)
    data = poisoned(bad)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=len(data), accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        gradient_clip_val=1.0, accumulate_grad_batches=accumulate)
    if device_path:  # the host check must not run
        monkeypatch.setattr(trainer.strategy, "reduce_boolean_decision",
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("host check ran")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, train_dataloaders=DataLoader(data, batch_size=None))
    return task, [w for w in caught if "skipped" in str(w.message)], trainer


def test_applies_only_to_one_process_on_a_listed_device_with_a_fused_adamw_and_no_scaler():
    fused = build_adamw([{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-3, 0.0, True)
    plain = build_adamw([{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-3, 0.0, False)
    cuda = torch.device("cuda")
    assert applies("skip", 1, cuda, fused, None)
    assert not applies("skip", 2, cuda, fused, None)  # DDP: the ranks agree on the host
    assert not applies("skip", 1, cuda, plain, None) and not applies("skip", 1, cuda, fused, object())
    assert not applies("stop", 1, cuda, fused, None) and not applies("skip", 1, CPU, fused, None)


# with accumulation, batch 0 is bad and batch 1 of its window good: the window's step is still skipped
@pytest.mark.parametrize("accumulate, bad", [(1, (1, 3)), (2, (0, 3))])
@pytest.mark.slow
def test_device_decision_trains_like_the_host_check(tmp_path, monkeypatch, accumulate, bad):
    host, host_warned, host_trainer = train(tmp_path / "host", False, bad, monkeypatch, accumulate)
    dev, dev_warned, trainer = train(tmp_path / "dev", True, bad, monkeypatch, accumulate)
    assert len(host_warned) == 1 and len(dev_warned) == 1
    for (name, a), b in zip(host.named_parameters(), dev.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    if accumulate > 1:  # (the host check counts bad batches, the device its skipped optimizer steps)
        return
    assert host.nonfinite_steps == dev.nonfinite_steps == 2
    # the skipped steps left the AdamW state as the host check does: 3 steps taken of 5
    opt = trainer.optimizers[0]
    assert all(int(opt.state[p]["step"]) == 3 for p in dev.parameters())
    assert not hasattr(opt, "found_inf")  # taken off at the end of training
    # the epoch's loss and metrics left the skipped steps out alike
    for key in ("train/loss_epoch", "train/mIoU", "train/acc"):
        value = trainer.callback_metrics[key]
        assert torch.isfinite(value), key
        torch.testing.assert_close(value, host_trainer.callback_metrics[key], msg=key)


def test_device_decision_leaves_weights_and_moments_on_a_nonfinite_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_adamw([{"params": [p]}], 0.1, 0.1, True)
    skip = DeviceSkip(opt, CPU)
    p.grad = torch.ones(3)
    skip.decide(torch.tensor(1.0))
    opt.step()
    skip.after_step()
    after_one = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), int(opt.state[p]["step"]))
    p.grad = torch.full((3,), float("nan"))
    # an accumulation window: one bad batch of two skips the step
    assert bool(skip.decide(torch.tensor(float("inf")))) and not bool(skip.decide(torch.tensor(2.0)))
    opt.step()
    skip.after_step()
    assert torch.equal(p, after_one[0]) and torch.equal(opt.state[p]["exp_avg"], after_one[1])
    assert int(opt.state[p]["step"]) == after_one[2] == 1
    assert skip.read() == (1, 1) and skip.read() == (1, 0)
    p.grad = torch.ones(3)
    skip.decide(torch.tensor(3.0))
    opt.step()  # the flag was cleared: this one steps
    assert int(opt.state[p]["step"]) == 2 and not torch.equal(p, after_one[0])


@pytest.mark.parametrize("bad", [()])
def test_device_decision_without_a_bad_step_warns_nothing(tmp_path, monkeypatch, bad):
    task, warned, _ = train(tmp_path, True, bad, monkeypatch)
    assert task.nonfinite_steps == 0 and warned == []
