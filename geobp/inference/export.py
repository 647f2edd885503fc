"""``geobp export``: a checkpoint as one ONNX or TorchScript file that runs without geobp.

The exported graph (:class:`RawToProbabilities`) takes raw pixels [B, C, H, W] in the training
files' data type and returns class probabilities [B, K, H, W] (softmax). The training
normalisation is inside it, computed as :class:`~geobp.data.preprocessing.Preprocessing` does
(float32; clip for ``percentile``; minus offset, times scale), and so is its nodata rule: a pixel
whose every band holds the nodata value, or a non-finite band of a float input, becomes 0 after
normalising. Batch, height and width are dynamic: any tile size runs (a U-Net's input is padded
inside the graph to a multiple of its stride, as the U-Net itself does). The metadata
(:class:`~geobp.inference.exported.ModelMetadata`) is written into the file, under a temporary name
renamed when complete.

ONNX: exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at
opset :data:`ONNX_OPSET`. That exporter needs no extra package (the dynamo exporter needs
``onnxscript``), takes dynamic axes without tracing guards on the tile size, and has exported
convolutional networks for years. It does not know uint16 or uint32 tensors, so such inputs are
traced as int32 or int64 (which hold every value) and the graph input's type is then set to the
file's: its only consumer is the first ``Cast`` to float32, which accepts any numeric type.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geobp.atomic import atomic_path
from geobp.choices import ExportFormat, check_choice
from geobp.classes import class_names_for
from geobp.data.preprocessing import Preprocessing
from geobp.errors import CheckpointError, ConfigError, ExportedModelError, format_error
from geobp.inference.exported import EXPORTED_SUFFIXES, TORCHSCRIPT_METADATA, ModelMetadata
from geobp.inference.options import DEFAULT_TILE_SIZE
from geobp.inference.outputs import colour_table
from geobp.inference.sinks import check_outputs_free
from geobp.models.unet import STRIDE, UNet
from geobp.task import SegmentationTask

#: ONNX opset of exported graphs. 17 is run by every ONNX Runtime since 1.14 on its CPU and CUDA
#: providers, and every operator of the graph (Cast, Conv, BatchNormalization, Resize, ReduceMin,
#: Softmax, Where ...) has kernels for both; newer opsets add nothing these graphs use, and would
#: shut out older runtimes (opset 18 changed the reduce operators' signature).
ONNX_OPSET = 17
#: Input dtypes the TorchScript-based ONNX exporter cannot trace, and the signed type traced instead.
_ONNX_CARRIERS = {"uint16": torch.int32, "uint32": torch.int64}


class RawToProbabilities(nn.Module):
    """Raw pixels in the file's dtype -> class probabilities, the training normalisation inside.

    Args:
        model: maps normalised float32 tiles [B, C, H, W] to logits [B, K, H, W].
        preprocessing: the training preprocessing (its normalisation and nodata are built in).
        dtype: numpy name of the input dtype.
    """

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, dtype: str) -> None:
        super().__init__()
        self.model = model
        # the U-Net pads its input to a multiple of its stride under a Python `if`, which a trace
        # fixes to the example's size; padding here, unconditionally, keeps the tile size free
        self.multiple = STRIDE if isinstance(model, UNet) else 1
        offset, scale, high = preprocessing.normalization_constants()
        self.register_buffer("offset", torch.from_numpy(offset[None]))
        self.register_buffer("scale", torch.from_numpy(scale[None]))
        self.register_buffer("high", None if high is None else torch.from_numpy(high[None]))
        self.floating = bool(np.issubdtype(np.dtype(dtype), np.floating))
        nodata = preprocessing.nodata
        # the nodata value as the raw dtype holds it, then as float32 (as Preprocessing compares it)
        self.nodata = (None if nodata is None or (isinstance(nodata, float) and np.isnan(nodata))
                       else float(np.asarray(nodata, dtype=dtype).astype(np.float32)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, K, H, W] for raw pixels [B, C, H, W]."""
        x = pixels.to(torch.float32)
        valid = torch.ones_like(x[:, 0], dtype=torch.bool)
        if self.floating:
            valid = valid & torch.isfinite(x).all(dim=1)
        if self.nodata is not None:
            valid = valid & ~(x == self.nodata).all(dim=1)
        if self.high is not None:  # percentile: clip to [low, high] first
            x = torch.minimum(torch.maximum(x, self.offset), self.high)
        x = (x - self.offset) * self.scale
        x = torch.where(valid.unsqueeze(1), x, torch.zeros_like(x))
        height, width = x.shape[-2:]
        if self.multiple > 1:
            x = F.pad(x, (0, (-width) % self.multiple, 0, (-height) % self.multiple))
        return torch.softmax(self.model(x).float(), dim=1)[..., :height, :width]


def export_metadata(task: SegmentationTask, preprocessing: Preprocessing, source: str | Path | None = None) -> ModelMetadata:
    """The metadata of ``task``'s export (``source``: its checkpoint, named in errors).

    Raises:
        CheckpointError: the checkpoint does not record its input data type.
    """
    hp = task.hparams
    if not preprocessing.dtype:
        raise CheckpointError(format_error(source, "the checkpoint does not record the training data type",
                                           "train it again with `geobp fit`, which records it, then export"))
    k = int(hp["num_classes"])
    names = class_names_for(hp.get("class_names"), k)
    colours = colour_table(k, names, 255)
    band_names = list(preprocessing.band_names or hp.get("in_band_names") or [f"band_{b}" for b in preprocessing.bands])
    pre = preprocessing
    normalisation: dict[str, Any] = ({"method": "meanstd", "mean": list(pre.mean), "std": list(pre.std)} if pre.method == "meanstd"
                                     else {"method": "percentile", "low": list(pre.low), "high": list(pre.high)})
    crs = hp.get("crs")
    return ModelMetadata(
        input_dtype=str(np.dtype(pre.dtype)), bands=list(pre.bands), band_names=band_names, class_names=names,
        class_colours=[list(colours[i][:3]) for i in range(k)], tile_size=int(hp.get("tile_size") or DEFAULT_TILE_SIZE),
        normalisation=normalisation, nodata=pre.nodata, training_crs=None if crs is None else str(crs),
        ignore_index=int(hp.get("ignore_index", 255)), label_options=hp.get("label_options"),
        model={"model": hp.get("model"), "encoder": hp.get("encoder")},
    )


def export_model(ckpt: str | Path, out: str | Path, fmt: ExportFormat = "onnx", *, overwrite: bool = False) -> Path:
    """Export a ``geobp fit`` checkpoint as one ONNX or TorchScript file (see the module's docstring).

    The checkpoint is read as data (:func:`geobp.checkpoint.load_checkpoint_data`).

    Args:
        ckpt: the checkpoint.
        out: the file to write (``.onnx`` for ONNX; ``.pt`` or ``.ts`` for TorchScript, so that
            ``geobp infer --model`` recognises it).
        fmt: ``onnx`` or ``torchscript``.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        DataNotFoundError, CheckpointError: the checkpoint cannot be loaded.
        ConfigError: an unknown format, a suffix that is not the format's, or ONNX export
            without the ``onnx`` package.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    check_choice("format", fmt, ExportFormat)
    out = Path(out)
    suffixes = [s for s, kind in EXPORTED_SUFFIXES.items() if kind == fmt]
    if out.suffix.lower() not in suffixes:
        raise ConfigError(format_error(out, f"a {fmt} model needs the suffix {' or '.join(suffixes)} (found {out.suffix or 'none'})",
                                       f"name the file {out.with_suffix(suffixes[0]).name}, so that `geobp infer --model` recognises it"))
    check_outputs_free([out], overwrite)
    task = SegmentationTask.from_checkpoint(ckpt)
    pre = task.preprocessing
    if pre is None:  # from_checkpoint refuses such files; a task built by hand may lack it
        raise CheckpointError(format_error(ckpt, "checkpoint has no preprocessing (band statistics)", "train with `geobp fit`, which stores them"))
    meta = export_metadata(task, pre, ckpt)
    graph = RawToProbabilities(task.model, pre, meta.input_dtype).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # expected: the U-Net's padding `if` traced as a constant (the graph pads before it, see
        # RawToProbabilities), and torch's notes that torch.jit and this ONNX exporter are deprecated
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch\.(jit|onnx)")
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        if fmt == "onnx":
            _write_onnx(graph, meta, out)
        else:
            _write_torchscript(graph, meta, out)
    return out


def _example(meta: ModelMetadata, dtype: torch.dtype, batch: int = 2) -> torch.Tensor:
    """An input to trace with: values in the dtype's range (their values do not shape the graph)."""
    shape = (batch, len(meta.bands), meta.tile_size, meta.tile_size)
    return torch.from_numpy(np.random.default_rng(0).integers(0, 100, shape).astype(np.float32)).to(dtype)


def _write_onnx(graph: RawToProbabilities, meta: ModelMetadata, out: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError(format_error(out, "exporting ONNX needs the onnx package", "pip install 'geobp[export]'")) from None
    file_dtype = np.dtype(meta.input_dtype)
    carrier = _ONNX_CARRIERS.get(file_dtype.name, torch.from_numpy(np.empty(0, file_dtype)).dtype)
    buffer = io.BytesIO()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    # dynamo=False: the TorchScript-based exporter (see the module's docstring for why)
    torch.onnx.export(graph, (_example(meta, carrier),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=[meta.input_name], output_names=[meta.output_name],
                      dynamic_axes={meta.input_name: dynamic, meta.output_name: dynamic})
    model = onnx.load_model_from_string(buffer.getvalue())
    if carrier != torch.from_numpy(np.empty(0, file_dtype)).dtype:
        _retype_input(model, meta.input_name, onnx.helper.np_dtype_to_tensor_dtype(file_dtype))
    model.producer_name = "geobp"
    model.doc_string = (f"geobp land-cover model: raw {meta.input_dtype} pixels [B, {len(meta.bands)}, H, W] "
                        f"(bands {', '.join(meta.band_names)}) -> probabilities [B, {meta.num_classes}, H, W]")
    del model.metadata_props[:]
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    with atomic_path(out, suffix=".onnx") as tmp:
        tmp.write_bytes(model.SerializeToString())


def _retype_input(model: Any, name: str, elem_type: int) -> None:
    """Set the graph input ``name`` to ``elem_type``; every node reading it must be a ``Cast``."""
    readers = [node for node in model.graph.node if name in node.input]
    if not readers or any(node.op_type != "Cast" for node in readers):
        raise ExportedModelError(format_error(None, f"the exported graph reads its input with {[n.op_type for n in readers]}, not only Cast",
                                              "report this as a geobp bug (the export of this input dtype)"))
    (graph_input,) = [i for i in model.graph.input if i.name == name]
    graph_input.type.tensor_type.elem_type = elem_type


def _write_torchscript(graph: RawToProbabilities, meta: ModelMetadata, out: Path) -> None:
    file_dtype = torch.from_numpy(np.empty(0, np.dtype(meta.input_dtype))).dtype
    # tracing records the operations once; shapes stay symbolic (size() calls), so batch and tile size are free
    traced = torch.jit.trace(graph, (_example(meta, file_dtype),), check_trace=False)
    metadata = {key: json.loads(value) for key, value in meta.to_props().items()}
    with atomic_path(out, suffix=out.suffix or ".pt") as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
