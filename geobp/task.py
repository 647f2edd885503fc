"""``SegmentationTask``: the LightningModule that trains a segmentation model on the batch contract."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from geobp.checkpoint import read_task_checkpoint, rebuild_kwargs
from geobp.classes import class_names_for
from geobp.compiled import CompiledForward, CompileMode, compile_mode
from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError, format_error
from geobp.losses import class_weights_from_counts, create_loss
from geobp.models import EncoderName, ModelName, create_model
from geobp.nonfinite_protocol import NonFiniteProtocol
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
        loss: a loss of the registry :data:`geobp.losses.LOSSES`: ``ce``, ``dice``, ``focal``,
            ``ce+dice``, or one added with :func:`geobp.losses.register_loss`.
        loss_kwargs: the loss's own options (e.g. ``{gamma: 1.5}`` for ``focal``), checked against
            the loss function's signature.
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
            and the first module whose output went non-finite (:mod:`geobp.nonfinite_protocol`).
            Checking costs one device-to-host sync per step, except on one CUDA device with the
            fused AdamW and no loss scaler, where ``skip`` is decided on the device
            (:mod:`geobp.nonfinite`); ``ignore`` turns it off.
        compile: run the model's forward through ``torch.compile``: ``false``, ``true`` (mode
            ``default``) or a mode (``reduce-overhead``, ``max-autotune``,
            ``max-autotune-no-cudagraphs``). Layer names, hooks and checkpoints stay those of the
            plain model (:mod:`geobp.compiled`); a forward pass while hooks are registered (the
            gradient-flow monitor's recording steps) runs eagerly. Not used by
            :meth:`from_checkpoint` (inference runs the plain model).
        fused: AdamW's fused implementation: ``null`` (auto: on CUDA, unless ``16-mixed`` and
            gradient clipping run together), ``true`` or ``false`` (:mod:`geobp.optim`).
        label_options: how raw labels became class ids in training (linked from the data
            options by the CLI; stored for ``geobp infer --labels``): ``{"label_map": {raw: class},
            "label_field": str | None, "label_background": int | None, "all_touched": bool}``.
            None when not given (checkpoints from before the option lack it).

    Raises:
        ConfigError: a negative ``freeze_encoder_epochs`` or ``encoder_lr_mult``, an unknown
            model, encoder or loss (the message lists the valid ones), or ``label_options`` with
            keys other than those above.
    """

    def __init__(
        self,
        model: ModelName = "unet",
        encoder: EncoderName = "resnet34",
        weights: str | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        ignore_index: int = 255,
        loss: str = "ce",
        loss_kwargs: dict[str, Any] | None = None,
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
        check_label_options(label_options)
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
        self.criterion = create_loss(loss, ignore_index=ignore_index,
                                     class_weights=None if class_weights == "auto" else class_weights,
                                     **(loss_kwargs or {}))
        self.class_names = class_names_for(class_names, num_classes)
        # the NaN/Inf step protocol (skip agreed over ranks, or decided on the device; or stop)
        self.nonfinite_protocol = NonFiniteProtocol(nonfinite, ignore_index)
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

        ``validate=False`` skips torchmetrics' checks of the label values, a cost paid on every
        training step otherwise (timing: BENCHMARKS.md, section 2): the training labels have been
        checked already (by the tile dataset, and by the loss), and validation and test keep the
        checks.
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
        protocol = self.nonfinite_protocol
        if stage == "train" and protocol.device_skip is not None:
            # decided on the device: a non-finite step's loss and pixels count nowhere, and the
            # fused AdamW skips its update (geobp.nonfinite)
            mask, value = protocol.mask_on_device(self, loss, mask, value)
        elif stage == "train" and protocol.host_rejects(loss):
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
        # max(dim).indices is argmax (the first maximum), taken for its speed over the class
        # dimension on CPUs (timing: BENCHMARKS.md, section 2)
        self.metrics[f"{stage}_metrics"].update(logits.detach().max(dim=1).indices, mask)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The batch's loss, or, when any rank cannot train on its batch, a zero loss every rank
        returns and whose step updates nothing (:mod:`geobp.nonfinite_protocol`).

        Raises:
            NonFiniteError: under ``nonfinite: stop``, a NaN/Inf loss on some rank.
        """
        loss = self._shared_step(batch, "train")
        return self.nonfinite_protocol.training_loss(self, self._trainer_or_none(), batch, loss)  # type: ignore[return-value]

    def _trainer_or_none(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    @property
    def nonfinite_steps(self) -> int:
        """Training steps skipped for a NaN/Inf loss so far (device skips counted at epoch ends)."""
        return self.nonfinite_protocol.steps

    def on_after_backward(self) -> None:
        self.nonfinite_protocol.drop_gradients(self)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.nonfinite_protocol.after_optimizer_step(self.trainer)

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
        self.nonfinite_protocol.start(trainer, self.device)

    def on_train_epoch_end(self) -> None:
        self.nonfinite_protocol.read_device_skips(self.global_step)
        self._log_metrics("train")

    def on_train_end(self) -> None:
        self.nonfinite_protocol.end(self.trainer)

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
        ckpt = read_task_checkpoint(path)
        task = cls(**rebuild_kwargs(ckpt["hyper_parameters"], inspect.signature(cls.__init__).parameters))
        task.load_state_dict(ckpt["state_dict"])
        return task.to(map_location).eval()


#: The keys of ``label_options`` (see :class:`SegmentationTask`).
LABEL_OPTION_KEYS = ("label_map", "label_field", "label_background", "all_touched")


def check_label_options(options: dict[str, Any] | None) -> None:
    """Check the keys of ``model.label_options`` (None passes).

    Raises:
        ConfigError: not a mapping, or a key other than :data:`LABEL_OPTION_KEYS`.
    """
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError(format_error(
            None, f"model.label_options must be a mapping (found {type(options).__name__})",
            f"give a mapping with some of the keys {', '.join(LABEL_OPTION_KEYS)}, or null"))
    unknown = sorted(str(k) for k in set(options) - set(LABEL_OPTION_KEYS))
    if unknown:
        raise ConfigError(format_error(
            None, f"model.label_options has unknown keys (expected some of {list(LABEL_OPTION_KEYS)}, found {unknown})",
            f"remove {', '.join(unknown)}"))
