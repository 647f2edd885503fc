"""``SegmentationTask``: the LightningModule that trains a segmentation model on the batch contract."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from geobp.classes import class_names_for
from geobp.compiled import CompiledForward, CompileMode, compile_mode
from geobp.data.preprocessing import Preprocessing
from geobp.errors import CheckpointError, ConfigError, DataNotFoundError, NonFiniteError, format_error
from geobp.losses import LossName, SegmentationLoss, class_weights_from_counts
from geobp.models import EncoderName, ModelName, create_model
from geobp.nonfinite import DeviceSkip, applies as device_skip_applies
from geobp.optim import build_adamw, clip_gradients, keep_implementation, unscales_in_step, use_fused

Stage = Literal["train", "val", "test"]


class SegmentationTask(L.LightningModule):
    """Semantic segmentation of multi-band tiles: model, loss, metrics and optimizer, built once.

    Logged metrics (``<stage>`` is ``train``, ``val`` or ``test``): ``<stage>/loss``,
    ``<stage>/mIoU``, ``<stage>/F1`` (macro), ``<stage>/acc`` (pixel accuracy), and
    ``<stage>/IoU_<class name>`` per class. Pixels labelled ``ignore_index`` count nowhere.

    The checkpoint describes itself: its hyperparameters hold the architecture, band and class
    counts, class names and the data's :class:`~geobp.data.preprocessing.Preprocessing`, so
    :meth:`from_checkpoint` rebuilds the model and its preprocessing from the file alone.

    Args:
        model: architecture name from the registry (``unet`` or ``deeplabv3``).
        encoder: ResNet encoder (``resnet18``, ``resnet34``, ``resnet50``).
        weights: encoder start weights: a torchgeo weights name (``ResNet18_Weights.SENTINEL2_ALL_MOCO``,
            read from torch's hub cache, bands matched by name), the path of a local torchvision
            ResNet state dict, or None (random). Not needed to rebuild from a checkpoint.
        in_channels: input bands (linked from the data module by the CLI).
        num_classes: classes (linked from the data module by the CLI).
        ignore_index: label excluded from loss and metrics.
        loss: ``ce``, ``dice``, ``focal`` or ``ce+dice``.
        class_weights: per-class loss weights, None, or ``auto``: from the training label frequencies
            (inverse square root, normalised to mean 1), which :meth:`setup` asks the trainer's data
            module for (its ``class_pixels``) and records in the hyperparameters (so in the checkpoint).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: ``cosine`` (per step, to zero), ``onecycle`` or ``none``.
        channels_last: run the model in channels-last memory format (faster convolutions on GPUs).
        class_names: one name per class (linked from the data module by the CLI).
        preprocessing: the data's preprocessing as a dict (linked by the CLI; stored for inference).
        in_band_names: one name per input band (linked from the data module's ``band_names`` by
            the CLI), matched against torchgeo weights' bands; None means the weights' own bands
            in order. (Not ``band_names``: Lightning refuses a key the data module's
            hyperparameters also hold, there the names of the files' bands.)
        freeze_encoder_epochs: train the decoder (and head) alone for this many epochs: the
            encoder's parameters get no gradient and its BatchNorm statistics stay as loaded
            (Lightning's ``BaseFinetuning.freeze``); from then on it trains. Under DDP it needs
            ``trainer.strategy: ddp_find_unused_parameters_true`` (checked at the start of fit).
        encoder_lr_mult: the encoder's learning rate is ``lr * encoder_lr_mult`` (its own
            optimizer parameter group, scheduled like the rest), e.g. 0.1 to fine-tune
            pretrained weights gently.
        tile_size: training tile size (linked; the default tile size for inference).
        model_kwargs: extra options of the model class (e.g. ``decoder_channels``).
        nonfinite: what a NaN/Inf training loss does: ``skip`` the step (counted in
            ``train/nonfinite_steps``) or ``stop`` with an error naming the step, the batch's tiles
            and the first module whose output went non-finite. Checking costs one device-to-host
            sync per step, except on one CUDA device with the fused AdamW and no loss scaler, where
            ``skip`` is decided on the device (:mod:`geobp.nonfinite`); ``ignore`` turns it off.
        compile: run the model's forward through ``torch.compile``: ``false``, ``true`` (mode
            ``default``) or a mode (``reduce-overhead``, ``max-autotune``,
            ``max-autotune-no-cudagraphs``). Layer names, hooks and checkpoints stay those of the
            plain model (:mod:`geobp.compiled`); a forward pass while hooks are registered (the
            gradient-flow monitor's recording steps) runs eagerly. Not used by
            :meth:`from_checkpoint` (inference runs the plain model).
        fused: AdamW's fused implementation: ``null`` (auto: on CUDA, unless ``16-mixed`` and
            gradient clipping run together), ``true`` or ``false`` (:mod:`geobp.optim`).
        label_options: how the data read its labels (``label_map``, ``label_field``,
            ``label_background``, ``all_touched``; linked by the CLI), stored for ``geobp infer --labels``.
    """

    def __init__(
        self,
        model: ModelName = "unet",
        encoder: EncoderName = "resnet34",
        weights: str | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        ignore_index: int = 255,
        loss: LossName = "ce",
        class_weights: list[float] | Literal["auto"] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: Literal["cosine", "onecycle", "none"] = "cosine",
        channels_last: bool = False,
        class_names: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
        tile_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        nonfinite: Literal["skip", "stop", "ignore"] = "skip",
        in_band_names: list[str] | None = None,
        freeze_encoder_epochs: int = 0,
        encoder_lr_mult: float = 1.0,
        compile: bool | CompileMode = False,
        fused: bool | None = None,
        label_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if freeze_encoder_epochs < 0 or encoder_lr_mult < 0:
            raise ConfigError(format_error(
                None, f"freeze_encoder_epochs and encoder_lr_mult must be >= 0 (found {freeze_encoder_epochs}, {encoder_lr_mult})",
                "set model.freeze_encoder_epochs to a number of epochs and model.encoder_lr_mult to a factor such as 0.1"))
        self.model = create_model(
            model, encoder=encoder, in_channels=in_channels, num_classes=num_classes, weights=weights,
            band_names=in_band_names, **(model_kwargs or {})
        )
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mode = compile_mode(compile)
        # a plain attribute, no child module: state_dict and module names stay the model's own
        self._compiled = CompiledForward(self.model, mode) if mode else None
        self.criterion = SegmentationLoss(loss, ignore_index, None if class_weights == "auto" else class_weights)
        self.class_names = class_names_for(class_names, num_classes)
        self.nonfinite_steps = 0
        self._skipping = False
        self._scaler_state: dict[str, Any] | None = None
        self._bad_loss = float("nan")
        self._device_skip: DeviceSkip | None = None
        self.loss_means = torch.nn.ModuleDict({f"{stage}_loss": MeanMetric() for stage in ("train", "val", "test")})
        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": self._metrics(num_classes, ignore_index, validate=stage != "train") for stage in ("train", "val", "test")}
        )

    def setup(self, stage: str) -> None:
        """Resolve ``class_weights: auto`` from the data module's training class frequencies.

        The task asks the data module rather than having the CLI link the counts at instantiation,
        so that the masks are read only when the weights are wanted, plain Lightning use
        (``trainer.fit(task, datamodule=dm)``) works too, and neither package imports the other:
        the contract is one attribute, ``class_pixels`` (training pixels per class).

        Raises:
            ConfigError: ``auto`` without a data module that has ``class_pixels``.
        """
        if self.hparams["class_weights"] != "auto":
            return
        trainer = self._trainer_or_none()
        pixels = getattr(getattr(trainer, "datamodule", None), "class_pixels", None)
        if pixels is None:
            raise ConfigError(format_error(
                None, "model.class_weights: auto needs the training class frequencies, and the trainer has no data module with class_pixels",
                "give the trainer a GeoTiffDataModule (trainer.fit(task, datamodule=dm)) or list the weights"))
        weights = class_weights_from_counts(list(pixels))
        self.criterion.weight = torch.tensor(weights, dtype=torch.float32, device=self.device)
        self.hparams["class_weights"] = weights  # the checkpoint holds the weights used

    @staticmethod
    def _metrics(num_classes: int, ignore_index: int, validate: bool) -> MetricCollection:
        """mIoU, per-class IoU, macro F1 and pixel accuracy, without the ignored pixels.

        ``validate=False`` skips torchmetrics' checks of the label values, which cost as much as
        the update itself on every training step; the training labels have been checked already
        (by the tile dataset, and by the loss), and validation and test keep the checks.
        """
        kw = {"ignore_index": ignore_index, "validate_args": validate}
        return MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(num_classes, average="macro", **kw),
                "IoU": MulticlassJaccardIndex(num_classes, average="none", **kw),
                "F1": MulticlassF1Score(num_classes, average="macro", **kw),
                "acc": MulticlassAccuracy(num_classes, average="micro", **kw),
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, K, H, W] for images [B, C, H, W]."""
        if self.hparams["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._compiled is not None:
            return self._compiled(x)
        return self.model(x)

    def _shared_step(self, batch: dict[str, Any], stage: Stage) -> Tensor | None:
        """Loss of a batch (logged, metrics updated); None when the batch has no tile or, in
        training, when the loss is not finite (then nothing is logged or updated)."""
        if "skipped" in batch:
            # summed over ranks: every rank logs it (a batch always carries `skipped`)
            self.log(f"{stage}/skipped_tiles", batch["skipped"].float(), on_step=False, on_epoch=True, reduce_fx="sum",
                     sync_dist=True)
        if "raw" in batch:
            raise ConfigError(
                format_error(
                    None,
                    "the batch holds raw pixels (`raw`), not the normalised `image` of the batch contract",
                    "give the trainer the data module (trainer.fit(task, datamodule=dm)), whose "
                    "on_after_batch_transfer normalises batches on the device, or call "
                    "geobp.data.dataset.finish_batch(batch, dm.preprocessing) on each batch",
                )
            )
        if "image" not in batch:  # every tile of the batch failed to read (data.on_read_error: skip)
            return None
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["mask"])
        mask, value = batch["mask"], loss.detach()
        if stage == "train" and self._device_skip is not None:
            # decided on the device: a non-finite step's loss and pixels count nowhere, and the
            # fused AdamW skips its update (geobp.nonfinite)
            bad = self._device_skip.decide(loss)
            mask = torch.where(bad, self.hparams["ignore_index"], mask)
            value = torch.where(bad, 0.0, value)
            self.log("train/nonfinite_steps", self._device_skip.count.float(), on_step=True, on_epoch=False)
        elif stage == "train" and self.hparams["nonfinite"] != "ignore" and not bool(torch.isfinite(loss)):
            self._bad_loss = float(loss.detach())
            return None
        size = batch["image"].shape[0]
        # Epoch means (over labelled pixels) through a torchmetrics MeanMetric, which all-reduces its state once per epoch
        # under DDP (Lightning's sync_dist on a tensor would all-reduce every training step).
        # weighted by labelled pixels: a batch with none (partial label coverage) counts nowhere
        labelled = (mask != self.hparams["ignore_index"]).sum()
        self.loss_means[f"{stage}_loss"].update(value, weight=labelled)
        if stage == "train":
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
            self.log("train/loss_epoch", self.loss_means[f"{stage}_loss"], on_step=False, on_epoch=True, batch_size=size)
        else:
            self.log(f"{stage}/loss", self.loss_means[f"{stage}_loss"], on_step=False, on_epoch=True, prog_bar=stage != "test",
                     batch_size=size)
        # max(dim).indices is argmax (the first maximum), several times faster than argmax over
        # the class dimension on CPUs
        self.metrics[f"{stage}_metrics"].update(logits.detach().max(dim=1).indices, mask)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The batch's loss, or, when any rank cannot train on its batch, a step every rank skips.

        A batch is unusable when its loss is NaN/Inf (``nonfinite``) or all its tiles failed to
        read (``data.on_read_error: skip``). The ranks agree on one flag (one all-reduce under DDP;
        the check is one device-to-host sync per step, none with ``nonfinite: ignore``), and on a
        skip every rank returns :meth:`_zero_loss`, so DDP's gradient all-reduce still pairs up;
        :meth:`on_after_backward` then drops the gradients, the optimizer updates nothing and the
        loss scaler of ``16-mixed`` is left as it was (:meth:`optimizer_step`). Lightning's own
        skip (returning None) is refused under DDP.
        """
        loss = self._shared_step(batch, "train")
        if loss is not None and self._device_skip is not None:
            return loss  # decided on the device
        unusable = loss is None
        trainer = self._trainer_or_none()
        if trainer is None or (self.hparams["nonfinite"] == "ignore" and trainer.world_size == 1 and not unusable):
            return loss  # type: ignore[return-value]  # (a bare call, as in tests: nothing to agree with)
        if not trainer.strategy.reduce_boolean_decision(unusable, all=False):
            return loss  # type: ignore[return-value]
        return self._skip_step(batch, local_nonfinite="image" in batch and unusable)

    def _trainer_or_none(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def _skip_step(self, batch: dict[str, Any], local_nonfinite: bool) -> Tensor:
        """Count and report a step some rank cannot train on (or stop, under ``nonfinite: stop``)."""
        flags = self.all_gather(torch.tensor(local_nonfinite, device=self.device)).reshape(-1).tolist()
        nonfinite_anywhere = any(flags)
        if nonfinite_anywhere:
            self.nonfinite_steps += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if nonfinite_anywhere and self.hparams["nonfinite"] == "stop":
            if not local_nonfinite:
                raise NonFiniteError(format_error(
                    None, f"step {self.global_step}: training loss is not finite on another process (rank)",
                    "see that rank's error; lower model.lr, set trainer.gradient_clip_val, or set model.nonfinite: skip"))
            where = first_nonfinite_module(self.model, batch["image"])
            raise NonFiniteError(
                format_error(
                    None,
                    f"step {self.global_step}: training loss is {self._bad_loss} on tiles {describe_tiles(batch)}; "
                    f"first non-finite output: {where or 'none in forward (inputs or loss)'}",
                    "check those tiles with `geobp check`, lower model.lr, set trainer.gradient_clip_val, "
                    "or set model.nonfinite: skip; see the gradient-flow report of the run",
                )
            )
        # one warning a run, from the lowest rank affected
        if nonfinite_anywhere and self.nonfinite_steps == 1 and flags.index(True) == self.global_rank:
            rank = f"rank {self.global_rank}: " if self.trainer.world_size > 1 else ""
            warnings.warn(
                f"{rank}step {self.global_step}: loss is {self._bad_loss}; step skipped ({describe_tiles(batch)}). "
                "Later skips are counted in train/nonfinite_steps, not warned again",
                UserWarning, stacklevel=2,
            )
        self._skipping = True
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self._scaler_state = scaler.state_dict() if scaler is not None else None
        return self._zero_loss()

    def _zero_loss(self) -> Tensor:
        """A loss of 0 whose gradient is exactly 0 for every trainable parameter, NaN-free whatever
        the batch held (it reads one element of each parameter, not the model's output)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0

    def on_after_backward(self) -> None:
        # On a skipped step (gradients all-reduced by now under DDP) the optimizer gets no
        # gradient: AdamW then leaves every parameter and its moments as they are.
        if self._skipping:
            for p in self.parameters():
                p.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._device_skip is not None:
            self._device_skip.after_step()
        if self._skipping:
            self._skipping = False
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None and self._scaler_state is not None:
                scaler.load_state_dict(self._scaler_state)  # a skipped step does not grow or shrink the loss scale
            self._scaler_state = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_metrics(self, stage: Stage) -> None:
        # compute() has synchronised the metric states over the ranks already: every rank holds the
        # same values, and sync_dist's mean of them is that value (it only tells Lightning so)
        values = self.metrics[f"{stage}_metrics"].compute()
        per_class = values.pop("IoU")
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)
        self.log_dict({f"{stage}/IoU_{n}": v for n, v in zip(self.class_names, per_class)}, sync_dist=True)
        self.metrics[f"{stage}_metrics"].reset()

    def on_fit_start(self) -> None:
        """Under DDP, a frozen encoder needs DDP's detection of unused parameters (checked here).

        Raises:
            ConfigError: ``freeze_encoder_epochs > 0`` under DDP without ``find_unused_parameters``.
        """
        wrapped = self.trainer.strategy.model
        if (self.hparams["freeze_encoder_epochs"] > 0 and isinstance(wrapped, DistributedDataParallel)
                and not wrapped.find_unused_parameters):
            raise ConfigError(format_error(
                None, "model.freeze_encoder_epochs under DDP: the frozen encoder gets no gradient, which DDP "
                "refuses unless it looks for unused parameters",
                "set trainer.strategy: ddp_find_unused_parameters_true"))

    def on_train_epoch_start(self) -> None:
        """Freeze the encoder during the first ``freeze_encoder_epochs`` epochs, then unfreeze it.

        Decided from the epoch number at every epoch start, so a resumed run freezes alike.
        """
        if self.hparams["freeze_encoder_epochs"] <= 0:
            return
        encoder = self.model.encoder
        if self.current_epoch < self.hparams["freeze_encoder_epochs"]:
            BaseFinetuning.freeze(encoder, train_bn=False)
        else:
            BaseFinetuning.make_trainable(encoder)

    @property
    def encoder_frozen(self) -> bool:
        """True while the encoder is frozen (no encoder parameter requires a gradient)."""
        return not any(p.requires_grad for p in self.model.encoder.parameters())

    def on_train_start(self) -> None:
        """Keep the chosen AdamW after a resumed optimizer state (:func:`~geobp.optim.keep_implementation`),
        and decide ``nonfinite: skip`` on the device where that applies (:mod:`geobp.nonfinite`)."""
        trainer = self.trainer
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:  # a resumed optimizer state must not bring back another implementation
            keep_implementation(opt)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if opt is not None and device_skip_applies(self.hparams["nonfinite"], trainer.world_size, self.device, opt, scaler):
            self._device_skip = DeviceSkip(opt, self.device)

    def _read_device_skips(self) -> None:
        """Count the steps skipped on the device since the last read (one host read); warn the first time."""
        if self._device_skip is None:
            return
        _, new = self._device_skip.read()
        if new and self.nonfinite_steps == 0:
            warnings.warn(
                f"the training loss was not finite on {new} step(s) by step {self.global_step}; skipped. Decided on the "
                "device, so the tiles are not named: set model.nonfinite: stop to stop at the first and name them. "
                "Later skips are counted in train/nonfinite_steps, not warned again", UserWarning, stacklevel=2)
        self.nonfinite_steps += new

    def on_train_epoch_end(self) -> None:
        self._read_device_skips()
        self._log_metrics("train")

    def on_train_end(self) -> None:
        self._read_device_skips()
        if self._device_skip is not None:
            DeviceSkip.detach(self.trainer.optimizers[0])
            self._device_skip = None

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # the encoder in its own group (lr * encoder_lr_mult); frozen parameters get no gradient,
        # and AdamW leaves parameters without a gradient unchanged (no weight decay either)
        encoder = {id(p) for p in self.model.encoder.parameters()}
        if hp["encoder_lr_mult"] == 1.0:  # one group, as before the option: earlier checkpoints resume
            groups = [{"params": list(self.parameters()), "lr": hp["lr"]}]
        else:
            groups = [
                {"params": [p for p in self.parameters() if id(p) in encoder], "lr": hp["lr"] * hp["encoder_lr_mult"]},
                {"params": [p for p in self.parameters() if id(p) not in encoder], "lr": hp["lr"]},
            ]
        trainer = self._trainer_or_none()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
        fused = use_fused(hp.get("fused"), self.device, scaler, bool(getattr(trainer, "gradient_clip_val", None)))
        opt = build_adamw(groups, hp["lr"], hp["weight_decay"], fused)
        if hp["scheduler"] == "none":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if hp["scheduler"] == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except for a fused AdamW without a loss scaler, which Lightning's
        mixed-precision plugin refuses although its gradients are unscaled: clipped here alike."""
        if unscales_in_step(optimizer) and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----- rebuilding from a checkpoint -------------------------------------------------------

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The training preprocessing, or None when the task was built without data."""
        pre = self.hparams.get("preprocessing")
        return Preprocessing.from_dict(pre) if pre else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationTask:
        """Load a geobp checkpoint for inference (the encoder's start weights file is not needed).

        Raises:
            DataNotFoundError: the file does not exist.
            CheckpointError: the file is not a geobp checkpoint or lacks its preprocessing.
        """
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(format_error(path, "checkpoint not found", "pass the .ckpt written by `geobp fit` (see its checkpoints/ folder)"))
        ckpt = load_checkpoint_data(path)
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not hp or "state_dict" not in ckpt or "in_channels" not in hp:
            raise CheckpointError(format_error(path, "not a geobp checkpoint (no geobp hyperparameters)", "pass a .ckpt written by `geobp fit`"))
        if not hp.get("preprocessing"):
            raise CheckpointError(
                format_error(path, "checkpoint has no preprocessing (band statistics)", "train with `geobp fit`, which stores them")
            )
        # LightningCLI adds private keys (_class_path, _instantiator); keep the constructor's own
        accepted = inspect.signature(cls.__init__).parameters
        # training-only settings stay behind: no start weights, no compile
        task = cls(**{k: v for k, v in hp.items() if k in accepted and k not in ("weights", "compile")})
        task.load_state_dict(ckpt["state_dict"])
        return task.to(map_location).eval()


def describe_tiles(batch: dict[str, Any], limit: int = 4) -> str:
    """``scene (row, col)`` of the first tiles of a batch, for messages."""
    scenes, windows = batch.get("scene"), batch.get("window")
    if scenes is None or windows is None:
        return "unknown tiles"
    parts = [f"{s} (row {int(w[0])}, col {int(w[1])})" for s, w in zip(scenes[:limit], windows[:limit])]
    more = len(scenes) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


@torch.no_grad()
def first_nonfinite_module(model: torch.nn.Module, x: Tensor) -> str | None:
    """Re-run the forward pass and return the name of the first module whose output is NaN/Inf.

    Modules finish in forward order, children before their parent, so the first hit is the
    innermost module where the values went bad.
    """
    if not bool(torch.isfinite(x).all()):
        return "the input image"
    found: list[str] = []
    hooks = []

    def hook(name: str) -> Any:
        def fn(_m: torch.nn.Module, _i: Any, out: Any) -> None:
            if not found and isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
                found.append(name)

        return fn

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def load_checkpoint_data(path: Path) -> Any:
    """Read a checkpoint as data: ``torch.load(weights_only=True)``, which unpickles tensors,
    containers and plain values only, so a file from someone else cannot run code on load.

    Raises:
        CheckpointError: the file is unreadable, or it holds Python objects that loading would
            have to construct (refused, and nothing of it runs).
    """
    import pickle
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle torch can read at all
            raise CheckpointError(format_error(path, "cannot read the checkpoint (not a PyTorch checkpoint file)",
                                               "pass a .ckpt written by `geobp fit`")) from None
        raise CheckpointError(format_error(
            path, f"refused: the checkpoint holds Python objects that loading would have to run ({found.group(1)})",
            "use a checkpoint written by `geobp fit` (plain tensors and values); never load files you do not trust "
            "with weights_only=False")) from None
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(format_error(path, f"cannot read the checkpoint ({err})", "pass a .ckpt written by `geobp fit`")) from err
