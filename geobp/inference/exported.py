"""Exported models (``geobp export``): their metadata, and running them in geobp's streaming inference.

An exported model is one file: an ONNX graph (run by ONNX Runtime) or a TorchScript module (run
by ``torch.jit``). It takes raw pixels [B, C, H, W] in the training files' data type and returns
class probabilities [B, K, H, W]; the training normalisation and nodata handling are inside it.
Everything else a user needs (band names, classes, colours, tile size, the normalisation, nodata,
input dtype, training CRS) is in its metadata, :class:`ModelMetadata`: one JSON value per key,
in the ONNX file's ``metadata_props`` or in the TorchScript file's extra file ``geobp.json``.

:func:`load_exported` turns such a file into an :class:`ExportedModel`, an ``nn.Module`` that
:func:`~geobp.inference.batch.predict_many` and :func:`~geobp.inference.predict.predict_raster`
run like a checkpoint: its preprocessing (:class:`RawPixels`) hands the raw pixel values to the
model, and the model returns log-probabilities, which inference's softmax turns back into the
probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geobp.data.preprocessing import Preprocessing
from geobp.errors import ConfigError, DataNotFoundError, ExportedModelError, format_error

#: Version of the metadata layout, under the key ``geobp_export`` (a reader refuses newer ones).
METADATA_VERSION = 1
#: The TorchScript extra file holding the metadata (one JSON object, the same keys as ONNX's).
TORCHSCRIPT_METADATA = "geobp.json"
#: File suffixes of exported models, and their format.
EXPORTED_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
#: How an export is re-made, for the errors that need it.
EXPORT_FIX = "export the checkpoint with `geobp export CKPT --format onnx --out FILE.onnx` (or --format torchscript), or pass the checkpoint with --ckpt"


@dataclass(frozen=True)
class ModelMetadata:
    """What an exported model records about itself (each field one metadata key, its value JSON).

    Attributes:
        input_name, output_name: the graph's input (raw pixels [B, C, H, W]) and output
            (probabilities [B, K, H, W]).
        input_dtype: numpy name of the input's data type (the training files' dtype).
        bands: 1-based band numbers of the training files, in the model's input order.
        band_names: one name per input band.
        class_names: one name per class id.
        class_colours: [R, G, B] per class id, the colours of geobp's class maps.
        tile_size: the training tile size (any multiple of 32 runs; 32 for U-Nets of depth 5).
        normalisation: ``{"method": "meanstd", "mean": [...], "std": [...]}`` or
            ``{"method": "percentile", "low": [...], "high": [...]}`` (clip, then scale to [0, 1]),
            applied inside the graph.
        nodata: the raw value marking missing pixels (in every band), or None; inside the graph
            such pixels become 0 after normalisation (as do non-finite ones of float inputs).
        training_crs: the CRS of the training scenes (WKT or EPSG code), or None when the
            checkpoint does not record it.
        ignore_index: the label value training ignored.
        label_options: the label options of training (for scoring), or None.
        model: the architecture (``model``, ``encoder``).
    """

    input_dtype: str
    bands: list[int]
    band_names: list[str]
    class_names: list[str]
    class_colours: list[list[int]]
    tile_size: int
    normalisation: dict[str, Any]
    nodata: float | None = None
    training_crs: str | None = None
    ignore_index: int = 255
    label_options: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    input_name: str = "pixels"
    output_name: str = "probabilities"

    @property
    def num_classes(self) -> int:
        """The number of classes (of the output's second axis)."""
        return len(self.class_names)

    def to_props(self) -> dict[str, str]:
        """The metadata as ONNX ``metadata_props``: key -> JSON text, with ``geobp_export`` first.

        A NaN nodata is written as the string ``"nan"`` (JSON has no NaN).
        """
        values = dataclasses.asdict(self)
        if isinstance(self.nodata, float) and math.isnan(self.nodata):
            values["nodata"] = "nan"
        return {"geobp_export": json.dumps(METADATA_VERSION), **{k: json.dumps(v) for k, v in values.items()}}

    @classmethod
    def from_props(cls, path: str | Path, props: dict[str, str]) -> ModelMetadata:
        """Read :meth:`to_props` back.

        Raises:
            ExportedModelError: no geobp metadata, a newer layout, or a malformed entry.
        """
        if "geobp_export" not in props:
            raise ExportedModelError(format_error(path, "not a geobp export (its metadata has no geobp_export entry)", EXPORT_FIX))
        try:
            version = json.loads(props["geobp_export"])
            values = {f.name: json.loads(props[f.name]) for f in dataclasses.fields(cls) if f.name in props}
        except (TypeError, ValueError) as err:
            raise ExportedModelError(format_error(path, f"malformed geobp metadata ({err})", EXPORT_FIX)) from None
        if not isinstance(version, int) or version > METADATA_VERSION:
            raise ExportedModelError(format_error(
                path, f"exported by a newer geobp (metadata version {version}, this geobp reads {METADATA_VERSION})",
                "update geobp, or export the checkpoint again with this version"))
        if values.get("nodata") == "nan":
            values["nodata"] = float("nan")
        try:
            meta = cls(**values)
            np.dtype(meta.input_dtype)
            ok = len(meta.bands) == len(meta.band_names) > 0 and meta.class_names and int(meta.tile_size) > 0
        except (TypeError, ValueError) as err:
            raise ExportedModelError(format_error(path, f"malformed geobp metadata ({err})", EXPORT_FIX)) from None
        if not ok:
            raise ExportedModelError(format_error(path, "malformed geobp metadata (no bands, classes or tile size)", EXPORT_FIX))
        return meta

    def hparams(self) -> dict[str, Any]:
        """The checkpoint hyper-parameters inference and scoring read (``num_classes``, ``class_names``,
        ``in_band_names``, ``tile_size``, ``ignore_index``, ``label_options``)."""
        return {"num_classes": self.num_classes, "class_names": list(self.class_names), "in_band_names": list(self.band_names),
                "tile_size": self.tile_size, "ignore_index": self.ignore_index, "label_options": self.label_options,
                "in_channels": len(self.bands), **self.model}


@dataclass
class RawPixels(Preprocessing):
    """The preprocessing of an exported model: band selection and the validity mask as in training,
    but the pixel values are handed over as they are (as float32, which holds every 8- and 16-bit
    integer exactly), since the model normalises them itself.

    Pixels that inference counts as nodata (by the input file's nodata tag, which takes precedence
    over training's, as for a checkpoint) get :attr:`fill`: the model's own nodata value, so that
    the model zeroes them after normalising as the checkpoint's preprocessing does.

    Attributes:
        fill: the raw value given to the model at nodata pixels (its nodata; NaN for a float
            model without one, which it treats as missing); None leaves them 0.
    """

    fill: float | None = None

    @classmethod
    def for_model(cls, meta: ModelMetadata) -> RawPixels:
        """The raw-pixel preprocessing of an exported model."""
        n = len(meta.bands)
        fill = meta.nodata
        if fill is not None and not (isinstance(fill, float) and math.isnan(fill)):
            fill = float(np.asarray(fill, dtype=meta.input_dtype).astype(np.float32))  # as the model compares it
        elif np.issubdtype(np.dtype(meta.input_dtype), np.floating):
            fill = float("nan")
        else:
            fill = None
        return cls(bands=list(meta.bands), nodata=meta.nodata, method="meanstd", mean=[0.0] * n, std=[1.0] * n,
                   dtype=meta.input_dtype, band_names=list(meta.band_names), fill=fill)

    def _normalize_into(self, image: np.ndarray, x: np.ndarray) -> np.ndarray:
        valid = super()._normalize_into(image, x)  # (x - 0) * 1: the raw values, 0 at nodata
        if self.fill is not None and not valid.all():
            np.copyto(x, self.fill, where=~valid)
        return valid

    def _normalize_torch(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = super()._normalize_torch(raw)
        if self.fill is not None:
            x.masked_fill_(~valid.unsqueeze(-3), self.fill)
        return x, valid


class ExportedModel(nn.Module):
    """An exported model as inference runs it: raw pixel values (float32) in, log-probabilities out.

    Inference softmaxes what a model returns; the softmax of log-probabilities gives the
    probabilities back. ``hparams`` and ``preprocessing`` answer as a loaded checkpoint's do.

    Args:
        path: the model file.
        metadata: its :class:`ModelMetadata`.
        session: an ``onnxruntime.InferenceSession`` (ONNX), or None.
        module: a ``torch.jit.ScriptModule`` (TorchScript), or None.
    """

    def __init__(self, path: Path, metadata: ModelMetadata, session: Any = None, module: nn.Module | None = None) -> None:
        super().__init__()
        if (session is None) == (module is None):
            raise ValueError("pass an ONNX Runtime session or a TorchScript module")
        self.path, self.metadata, self.session = path, metadata, session
        self.module = module
        self.hparams = metadata.hparams()
        self._np_dtype = np.dtype(metadata.input_dtype)

    @property
    def preprocessing(self) -> RawPixels:
        """The :class:`RawPixels` preprocessing of this model."""
        return RawPixels.for_model(self.metadata)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, K, H, W] for raw pixel values [B, C, H, W] (float32, or the model's dtype)."""
        if self.module is not None:
            probs = self.module(x.to(_torch_dtype(self._np_dtype)))
        else:
            pixels = x.detach().cpu().numpy().astype(self._np_dtype, copy=False)
            out = self.session.run([self.metadata.output_name], {self.metadata.input_name: pixels})[0]
            probs = torch.from_numpy(out).to(x.device)
        return probs.float().log()


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def is_exported(path: str | Path) -> bool:
    """True for a path with the suffix of an exported model (``.onnx``, ``.pt``, ``.ts``)."""
    return Path(str(path)).suffix.lower() in EXPORTED_SUFFIXES


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Load an exported model for :func:`~geobp.inference.batch.predict_many`.

    ONNX files run in ONNX Runtime, on its CUDA provider for a CUDA ``device`` when the installed
    ONNX Runtime has it (``onnxruntime-gpu``; otherwise on the CPU, with a warning), with as many
    threads as torch computes with. TorchScript files are loaded with ``torch.jit.load`` onto
    ``device``.

    Raises:
        DataNotFoundError: the file does not exist.
        ConfigError: an unknown suffix, or ONNX Runtime is not installed.
        ExportedModelError: the file cannot be read, or is not a geobp export.
    """
    path = Path(path)
    kind = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(format_error(path, f"unknown model file type {path.suffix!r} (expected one of {', '.join(EXPORTED_SUFFIXES)})",
                                       "pass a file written by `geobp export`, or a checkpoint with --ckpt"))
    if not path.is_file():
        raise DataNotFoundError(format_error(path, "model file not found", EXPORT_FIX))
    if kind == "onnx":
        session = _onnx_session(path, torch.device(device))
        meta = ModelMetadata.from_props(path, dict(session.get_modelmeta().custom_metadata_map))
        return ExportedModel(path, meta, session=session)
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        with warnings.catch_warnings():  # torch's note that torch.jit is deprecated: nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ExportedModelError(format_error(path, f"cannot read the TorchScript model ({_first_line(err)})", EXPORT_FIX)) from None
    try:
        props = json.loads(extra[TORCHSCRIPT_METADATA] or "{}")
    except ValueError:
        props = None
    if not isinstance(props, dict):
        raise ExportedModelError(format_error(path, f"malformed geobp metadata (its {TORCHSCRIPT_METADATA} is not a JSON object)", EXPORT_FIX))
    meta = ModelMetadata.from_props(path, {k: json.dumps(v) for k, v in props.items()})
    return ExportedModel(path, meta, module=module.eval())


def _onnx_session(path: Path, device: torch.device) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(format_error(path, "ONNX Runtime is not installed", "pip install 'geobp[export]' (or onnxruntime-gpu for CUDA)")) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same compute threads as a checkpoint's run
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            warnings.warn(f"{path}: this ONNX Runtime has no CUDA provider; running on the CPU "
                          "(install onnxruntime-gpu to run ONNX models on the GPU)", RuntimeWarning, stacklevel=3)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        raise ExportedModelError(format_error(path, f"cannot read the ONNX model ({_first_line(err)})", EXPORT_FIX)) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."
