"""Export a trained captioner to ONNX or TorchScript: the encoder and one decoder step, and what a loop
around them needs, in one folder that runs without this package (:mod:`captioning.runtime`, as ``run.py``).

    <folder>/encoder.onnx   images (N, 3, S, S) -> the decoder's initial state (h, c, A, image: the cell's)
    <folder>/step.onnx      words (N,), state -> log-probabilities (N, V), the next h (and c) [, attention weights]
    <folder>/vocab.json     the words, index = id
    <folder>/config.json    image size, normalisation, special ids, the state's names, the format, guidance
    <folder>/prior.npz      guided decoding only: the decoder's state without an image
    <folder>/run.py         the decoding loops (greedy, beam) in NumPy, over ONNX Runtime or TorchScript

The step is the hand-written cell itself (``CaptioningRNN.step``), traced: the courses' math in the graph.
ONNX uses torch's dynamo exporter (the older TorchScript-based one mistranslated the encoder here); the batch
size is dynamic in both formats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models.captioner import CaptioningRNN, DecoderState
from .module import CaptioningModule
from .runtime import ImageContract

__all__ = ["FORMATS", "export_captioner", "load_exported", "state_names", "verify_export"]

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = 1


def state_names(decoder: CaptioningRNN) -> tuple[list[str], list[str]]:
    """(the state the encoder gives and the step takes, the part of it the step gives back)."""
    names = ["h"] + (["c"] if decoder.cell_type != "rnn" else [])
    constant = (["A"] if decoder.cell_type == "attention" else []) + (["image"] if decoder.image_input else [])
    return names + constant, names


class _Encode(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: CaptioningRNN, names: list[str]) -> None:
        super().__init__()
        self.encoder, self.decoder, self.names = encoder, decoder, names

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        state = self.decoder.init_state(self.encoder(images))
        return tuple(getattr(state, name) for name in self.names)


class _Step(nn.Module):
    def __init__(self, decoder: CaptioningRNN, names: list[str]) -> None:
        super().__init__()
        self.decoder, self.names = decoder, names

    def forward(self, words: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        scores, new, weights = self.decoder.step(words, DecoderState(**dict(zip(self.names, state, strict=True))))
        outputs = [scores.float().log_softmax(dim=1), new.h] + ([new.c] if new.c is not None else [])
        return tuple(outputs + ([weights] if weights is not None else []))


def export_captioner(module: CaptioningModule, contract: ImageContract | int, folder: str | Path,
                     format: str = "onnx", batch: int = 2) -> Path:
    """Write ``module`` (trained; on the CPU, in eval mode) into ``folder`` in ``format``; returns the folder.

    ``contract``: how images reach the model (``module.image_contract`` for a checkpoint; a side S means ImageNet's
    statistics, the whole image resized): ``config.json`` records it and ``run.py`` reads files by it."""
    if not isinstance(contract, ImageContract):
        contract = ImageContract(size=int(contract))
    image_size = contract.size
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = module.cpu().eval()
    encoder, decoder = module.encoder, module.decoder
    names, carried = state_names(decoder)
    images = torch.zeros(batch, 3, image_size, image_size)
    encode, step = _Encode(encoder, decoder, names).eval(), _Step(decoder, names).eval()
    with torch.no_grad():
        # distinct tensors: the attention model's c0 is its h0, and a tracer handed one tensor twice wires
        # both inputs of the step to the same value
        state = tuple(t.clone() for t in encode(images))
        words = torch.full((batch,), module.vocab.start_id, dtype=torch.long)
        step_outputs = step(words, *state)
    step_output_names = ["log_probs", *(f"{n}_next" for n in carried)] + (
        ["weights"] if len(step_outputs) > 1 + len(carried) else [])
    suffix = ".onnx" if format == "onnx" else ".pt"
    if format == "onnx":
        _to_onnx(encode, (images,), folder / "encoder.onnx", ["images"], names)
        _to_onnx(step, (words, *state), folder / "step.onnx", ["words", *names], step_output_names)
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.trace(encode, (images,), check_trace=False).save(str(folder / "encoder.pt"))
            torch.jit.trace(step, (words, *state), check_trace=False).save(str(folder / "step.pt"))
    config: dict[str, Any] = {
        "export_format": EXPORT_FORMAT, "format": format, "encoder": f"encoder{suffix}", "step": f"step{suffix}",
        "cell_type": decoder.cell_type, "image_size": image_size, "image": contract.as_dict(),
        "null_id": module.vocab.null_id, "start_id": module.vocab.start_id, "end_id": module.vocab.end_id,
        "state": names, "carried": carried, "step_outputs": step_output_names,
        "max_length": module.decoding.max_length,
    }
    guidance = module.decoding.guidance or 0.0
    if guidance:
        # guided decoding's second half: the state without an image (zero features), the same for every image
        with torch.no_grad():
            features = encoder(images[:1])
            prior = decoder.init_state(torch.zeros_like(features))
        import numpy as np

        np.savez(folder / "prior.npz", **{name: getattr(prior, name).numpy() for name in names})
        config["guidance"], config["prior"] = guidance, "prior.npz"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "vocab.json").write_text(json.dumps(module.vocab.idx_to_word))
    shutil.copyfile(Path(__file__).with_name("runtime.py"), folder / "run.py")
    return folder


def _to_onnx(model: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({0: batch},) if len(args) == 1 else ({0: batch}, tuple({0: batch} for _ in args[1:]))
    with warnings.catch_warnings(), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    dynamo=True, verbose=False)
    program.save(str(path))


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter's optimisation passes log every step at INFO, which Hydra's root logger prints (~60
    lines an export): only their warnings and errors are shown."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_exported(folder: str | Path) -> Any:
    """The exported folder's runtime (its own ``run.py``, imported as a module): ``ExportedCaptioner(folder)``."""
    import importlib.util

    folder = Path(folder)
    spec = importlib.util.spec_from_file_location(f"exported_{abs(hash(str(folder)))}", folder / "run.py")
    runtime = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = runtime  # dataclasses look their module up there
    spec.loader.exec_module(runtime)
    return runtime.ExportedCaptioner(folder)


def verify_export(module: CaptioningModule, folder: str | Path, images: Tensor | None = None,
                  max_length: int | None = None) -> None:
    """RuntimeError unless the export gives PyTorch's greedy captions (and log-probabilities to 1e-4) on
    ``images`` (default: 4 random ones)."""
    from .models.decoding import Guided, greedy_decode

    exported = load_exported(folder)
    size = exported.config["image_size"]
    if images is None:
        images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    max_length = max_length or module.decoding.max_length
    with torch.no_grad():
        guidance = module.decoding.guidance or 0.0
        model = Guided(module.decoder, guidance) if guidance else module.decoder
        expected = greedy_decode(model, module.encoder(images), max_length)
    captions, log_probs = exported.greedy(images.numpy(), max_length)
    if not (expected.captions.numpy() == captions).all() or not torch.allclose(
            expected.log_probs, torch.from_numpy(log_probs), atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"The export in {folder} does not caption as the PyTorch model does (greedy, on "
                           f"{len(images)} random images); it is kept there for inspection.")
