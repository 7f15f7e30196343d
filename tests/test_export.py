"""The exported captioner (ONNX, TorchScript) decodes as the PyTorch model does, through its own run.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioning.export import export_captioner, load_exported, verify_export
from captioning.models.decoding import CaptionDecoder, Guided, beam_search, greedy_decode
from captioning.module import CaptioningModule

from entrypoints import compose, load_entry_point, run, tiny

WORDS = ["<NULL>", "<START>", "<END>", "<UNK>", *[f"w{k}" for k in range(16)]]


def module(cell_type: str, seed: int = 0) -> CaptioningModule:
    torch.manual_seed(seed)
    m = CaptioningModule(
        encoder={"_target_": "captioning.models.encoder.SmallCNN", "out_dim": 16, "channels": [8, 16]},
        decoder={"_target_": "captioning.models.CaptioningRNN", "cell_type": cell_type, "wordvec_dim": 8,
                 "hidden_dim": 16, "image_input": cell_type != "attention", "feature_pool": "max"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, vocab=WORDS,
        decoding={"_target_": "captioning.models.decoding.CaptionDecoder", "strategy": "greedy", "max_length": 8},
    ).eval()
    with torch.no_grad():  # peaky distributions: captions that end, and beams with work to do
        m.decoder.vocab_proj.weight.mul_(6)
    return m


def compare(m: CaptioningModule, folder, images: torch.Tensor, max_length: int = 8) -> None:
    exported = load_exported(folder)
    guidance = m.decoding.guidance or 0.0
    decoder = Guided(m.decoder, guidance) if guidance else m.decoder
    assert exported.guidance == guidance
    with torch.no_grad():
        features = m.encoder(images)
        greedy = greedy_decode(decoder, features, max_length)
        beam = beam_search(decoder, features, beam_size=3, max_length=max_length)
    captions, log_probs = exported.greedy(images.numpy(), max_length)
    np.testing.assert_array_equal(captions, greedy.captions.numpy())  # greedy: exactly
    np.testing.assert_allclose(log_probs, greedy.log_probs.numpy(), rtol=1e-5, atol=1e-5)
    captions, log_probs = exported.beam(images.numpy(), 3, max_length)
    np.testing.assert_allclose(log_probs, beam.log_probs.numpy(), rtol=1e-5, atol=1e-5)  # beam: to float tolerance
    same = (captions == beam.captions.numpy()).all(axis=1)
    assert same.mean() >= 0.9, f"{(~same).sum()} of {len(same)} beam captions differ"


@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_torchscript_export_decodes_as_pytorch(tmp_path, cell_type):
    m = module(cell_type)
    folder = export_captioner(m, 16, tmp_path / "exported", "torchscript")
    compare(m, folder, torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("cell_type", ["lstm", "attention"])
def test_run_py_diverse_beam_and_ngram_blocking_decode_as_pytorch(tmp_path, cell_type):
    """run.py's NumPy loops carry the anchors' decoding too: diverse beam search (2 groups x 3) with trigram
    blocking and the GNMT length penalty, and greedy decoding with blocking, as captioning.models.decoding."""
    from captioning.models.decoding import StepRules

    m = module(cell_type, seed=3)
    folder = export_captioner(m, 16, tmp_path / "exported", "torchscript")
    exported = load_exported(folder)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rules = StepRules(block_ngrams=3, end_id=m.decoder.end_id)
    with torch.no_grad():
        features = m.encoder(images)
        greedy = greedy_decode(m.decoder, features, 12, rules)
        diverse = beam_search(m.decoder, features, beam_size=6, max_length=12, length_penalty=0.6, groups=2,
                              diversity=0.7, length_norm="gnmt", rules=rules)
    captions, log_probs = exported.greedy(images.numpy(), 12, block_ngrams=3)
    np.testing.assert_array_equal(captions, greedy.captions.numpy())
    np.testing.assert_allclose(log_probs, greedy.log_probs.numpy(), rtol=1e-5, atol=1e-5)
    captions, log_probs = exported.beam(images.numpy(), 6, 12, 0.6, groups=2, diversity=0.7, block_ngrams=3,
                                        length_norm="gnmt")
    np.testing.assert_allclose(log_probs, diverse.log_probs.numpy(), rtol=1e-5, atol=1e-5)
    assert (captions == diverse.captions.numpy()).all(axis=1).mean() >= 0.9
    def repeats(rows):
        grams = [[tuple(r[i:i + 3]) for i in range(len(r) - 2)] for r in ([w for w in row if w > 2] for row in rows)]
        return sum(len(g) - len(set(g)) for g in grams)

    assert repeats(captions.tolist()) == 0
    with torch.no_grad():  # the model does repeat itself, so blocking had work to do
        assert repeats(greedy_decode(m.decoder, features, 12).captions.tolist()) > 0


@pytest.mark.parametrize("cell_type", ["lstm", "attention"])
def test_a_guided_model_exports_its_guidance(tmp_path, cell_type):
    """A model trained with image dropout decodes guided (decoding.guidance=auto): the export keeps its state
    without an image (prior.npz) and run.py guides greedy decoding and beam search the same way."""
    m = module(cell_type)
    m.set_decoding(CaptionDecoder("greedy", max_length=8, guidance=1.5))
    folder = export_captioner(m, 16, tmp_path / "exported", "torchscript")
    assert json.loads((folder / "config.json").read_text())["guidance"] == 1.5 and (folder / "prior.npz").is_file()
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    compare(m, folder, images)
    with torch.no_grad():  # and guidance changed the scores, or the comparison shows nothing
        plain = greedy_decode(m.decoder, m.encoder(images), 8).log_probs
    guided = torch.from_numpy(load_exported(folder).greedy(images.numpy(), 8)[1])
    assert (plain - guided).abs().max() > 1e-3  # far above the comparison's 1e-5
    verify_export(m, folder, images)


def test_onnx_export_folder_and_its_run_py(tmp_path):
    m = module("attention")
    folder = export_captioner(m, 16, tmp_path / "exported", "onnx")
    assert {p.name for p in folder.iterdir()} == {"encoder.onnx", "step.onnx", "vocab.json", "config.json", "run.py"}
    config = json.loads((folder / "config.json").read_text())
    assert config["state"] == ["h", "c", "A"] and config["carried"] == ["h", "c"] and config["image_size"] == 16
    assert json.loads((folder / "vocab.json").read_text()) == WORDS
    compare(m, folder, torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    verify_export(m, folder)
    # run.py needs neither this package nor torch: the standalone command line on an image file
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code = "import sys; sys.modules['captioning'] = None; sys.modules['torch'] = None; import runpy; " \
           f"sys.argv = ['run.py', {str(folder)!r}, {str(tmp_path / 'a.png')!r}]; runpy.run_path({str(folder / 'run.py')!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, caption, log_prob = out.stdout.strip().split("\t")
    assert path.endswith("a.png") and float(log_prob) < 0


def test_a_bad_format_is_named(tmp_path):
    with pytest.raises(ValueError, match="format='tflite' is not one of onnx, torchscript"):
        export_captioner(module("rnn"), 16, tmp_path, "tflite")


@pytest.mark.slow
@pytest.mark.parametrize("cell_type", ["rnn", "lstm", "attention"])
def test_exported_trained_models_caption_the_validation_split_as_pytorch(tmp_path, cell_type):
    """Trained through train.py, exported through export.py (ONNX), run on the built-in validation split."""
    run_dir = tmp_path / "outputs" / "train" / "runs" / "tiny"
    load_entry_point("train").train(compose("train", tiny(tmp_path, f"model={cell_type}", "trainer.max_epochs=2",
                                                          "test=false"), run_dir))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_dir = tmp_path / "export"
    run("export.py", [f"ckpt_path={ckpt}", "format=onnx", f"hydra.run.dir={export_dir}"])
    from captioning.data import ShapesDataModule
    from captioning.module import load_checkpoint

    trained, data = load_checkpoint(ckpt)
    import inspect

    params = inspect.signature(ShapesDataModule.__init__).parameters
    dm = ShapesDataModule(**{k: v for k, v in data.items() if k in params})
    dm.setup("validate")
    images = torch.stack([dm.datasets["val"][k]["image"] for k in range(len(dm.datasets["val"]))])
    compare(trained.eval(), export_dir / "exported", images, max_length=20)
