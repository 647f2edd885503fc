"""The loss registry: built-in names, a loss registered by a test, and the errors that list the valid names."""

import pytest
import torch

import geobp.losses as losses
from geobp.errors import ConfigError
from geobp.losses import LOSSES, create_loss, cross_entropy, register_loss
from geobp.task import SegmentationTask


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so losses registered by a test leave the module's as it was."""
    monkeypatch.setattr(losses, "LOSSES", dict(LOSSES))
    return losses.LOSSES


def test_builtin_names_are_registered():
    assert set(LOSSES) == {"ce", "dice", "focal", "ce+dice"}


def test_registered_loss_is_usable_by_name_through_the_task(registry):
    calls = []

    @register_loss("offset_ce")
    def offset_ce(logits, target, ignore_index, weight=None, offset: float = 1.0):
        calls.append((ignore_index, None if weight is None else weight.tolist()))
        return cross_entropy(logits, target, ignore_index, weight) + offset

    assert registry["offset_ce"] is offset_ce
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, ignore_index=9, loss="offset_ce",
                            class_weights=[1.0, 2.0, 0.5])
    task.log = lambda *a, **kw: None
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.randint(0, 3, (2, 32, 32), generator=g)}
    loss = task.training_step(batch, 0)
    with torch.no_grad():
        expected = cross_entropy(task(batch["image"]), batch["mask"], 9, torch.tensor([1.0, 2.0, 0.5])) + 1.0
    torch.testing.assert_close(loss.detach(), expected)
    assert calls[0] == (9, [1.0, 2.0, 0.5])
    assert task.hparams["loss"] == "offset_ce"


def test_loss_options_reach_the_function():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    # focal with gamma 0 is plain cross-entropy; with the default gamma 2 it is smaller
    torch.testing.assert_close(create_loss("focal", gamma=0.0)(logits, target), create_loss("ce")(logits, target))
    assert create_loss("focal")(logits, target) < create_loss("ce")(logits, target)


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"^unknown loss \(expected one of \['ce', 'ce\+dice', 'dice', 'focal'\], "
                                          r"found 'dcie'\)\. Fix: set model\.loss to one of ce, ce\+dice, dice, focal"):
        SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, loss="dcie")


def test_unknown_option_and_bad_registration_are_refused(registry):
    with pytest.raises(ConfigError, match=r"unknown option for loss 'focal' \(expected some of \['gamma'\], found \['alpha'\]\)"):
        create_loss("focal", alpha=0.25)
    with pytest.raises(ConfigError, match=r"loss 'ce' is registered already .*Fix: register the new loss under another name"):
        register_loss("ce")(lambda logits, target, ignore_index, weight=None: logits.sum())
    with pytest.raises(ConfigError, match=r"lacks the parameter\(s\) \['ignore_index', 'weight'\] of the loss contract"):
        register_loss("bare")(lambda logits, target: logits.sum())
    assert "bare" not in registry


def test_loss_options_come_from_model_loss_kwargs_and_are_checked():
    """``model.loss_kwargs`` reaches the loss (focal's gamma from YAML); an option it lacks is an error."""
    from geobp.losses import focal_loss

    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, loss="focal", loss_kwargs={"gamma": 0.5})
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    torch.testing.assert_close(task.criterion(logits, target), focal_loss(logits, target, 255, 0.5))
    assert not torch.allclose(task.criterion(logits, target), focal_loss(logits, target, 255, 2.0))
    with pytest.raises(ConfigError, match="gama"):
        SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, loss="focal", loss_kwargs={"gama": 0.5})
