"""Caption-aware augmentation (data.augment): flips swap left and right in the captions, jitter and photometry
never make a reference false, and the DataModule augments training batches only."""

import dataclasses
import itertools

import pytest
import torch

from captioning.data.shapes import COLORS, ShapesDataModule
from captioning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CaptionAugment
from captioning.grounding import GroundingScorer

WORDS = {"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, "a": 4, "left": 5, "right": 6, "of": 7, "square": 8}
STILL = {"translate": 0.0, "scale": [1.0, 1.0], "rotate": 0.0, "brightness": 0.0, "contrast": 0.0, "noise": 0.0}


def test_a_flip_mirrors_the_image_and_swaps_left_and_right():
    augment = CaptionAugment(flip=1.0, **STILL)
    augment.bind(WORDS)
    images = torch.randn(3, 3, 8, 8)
    captions = torch.tensor([[1, 4, 8, 5, 2], [1, 6, 7, 5, 2], [1, 4, 8, 2, 0]])
    flipped, swapped = augment(images, captions)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    assert swapped.tolist() == [[1, 4, 8, 6, 2], [1, 5, 7, 6, 2], [1, 4, 8, 2, 0]]
    # without a flip nothing changes
    augment.flip = 0.0
    same, unchanged = augment(images, captions)
    assert torch.allclose(same, images, atol=1e-5) and torch.equal(unchanged, captions)


def _mirrored(scene):
    width = scene["width"]
    return {**scene, "objects": [{**o, "center": [width - o["center"][0], o["center"][1]]} for o in scene["objects"]]}


def _swap(caption):
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in caption.split())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    dm = ShapesDataModule(root=str(tmp_path_factory.mktemp("data") / "shapes"), num_train=20, num_val=200,
                          num_test=5, image_size=64, progress=False, num_workers=0)
    dm.prepare_data()
    return dm


def test_a_flipped_scenes_swapped_references_are_true_and_unswapped_ones_false(shapes):
    scenes, references = shapes.scenes("val"), shapes.references("val")
    original, mirrored = GroundingScorer(scenes), GroundingScorer({i: _mirrored(s) for i, s in scenes.items()})
    sided = [(i, ref) for i, refs in references.items() for ref in refs if {"left", "right"} & set(ref.split())]
    assert len(sided) > 100
    false_when_unswapped = 0
    for image_id, ref in sided:
        assert mirrored.details({image_id: _swap(ref)})[image_id].correct, _swap(ref)
        # unless the sides do not matter ("a green star on the left and a green star on the right")
        if not original.details({image_id: _swap(ref)})[image_id].correct:
            assert not mirrored.details({image_id: ref})[image_id].correct, ref
            false_when_unswapped += 1
    assert false_when_unswapped > 0.9 * len(sided)
    # and the augmentation's own swap table does what _swap does, on the vocabulary's ids
    shapes.setup("fit")
    vocab = shapes.vocab
    augment = CaptionAugment(flip=1.0, **STILL)
    augment.bind(vocab.word_to_idx)
    for _, ref in sided[:50]:
        ids = torch.tensor([vocab.encode(ref, 16)])
        assert vocab.decode(augment.swap_words(ids)[0].tolist()) == _swap(ref)


def _moved_centre(augment, theta, x, y, size):
    """Where the pixel at (x, y) of the input lands in the warped output (pixel units)."""
    point = torch.tensor([(2 * x / size) - 1, (2 * y / size) - 1], dtype=torch.float64)
    linear, shift = theta[:, :2].double(), theta[:, 2].double()
    out = torch.linalg.solve(linear, point - shift)
    return float((out[0] + 1) * size / 2), float((out[1] + 1) * size / 2)


def test_the_strongest_jitter_keeps_every_reference_true(shapes):
    """The default ranges at their corners (the most shift, zoom and rotation at once, with and without a flip):
    the objects' centres moved as the warp moves them, every reference (sides swapped when flipped) stays true."""
    scenes, references = shapes.scenes("val"), shapes.references("val")
    corners = list(itertools.product([0.0, 1.0], repeat=4))
    # the defaults data.augment=true uses, and with the rotation switched on
    for augment, flip, corner in itertools.product([CaptionAugment(), CaptionAugment(rotate=8.0, scale=[0.92, 1.08])],
                                                   [False, True],
                                                   corners):
        theta = augment.affine(torch.tensor([flip]), torch.tensor([corner]))[0]
        moved = {}
        for image_id, scene in scenes.items():
            objects = [{**o, "center": list(_moved_centre(augment, theta, *o["center"], scene["width"]))}
                       for o in scene["objects"]]
            moved[image_id] = {**scene, "objects": objects}
        scorer = GroundingScorer(moved)
        for k in range(5):
            captions = {i: _swap(refs[k]) if flip else refs[k] for i, refs in references.items()}
            scores = scorer(captions)
            assert scores["correct"] == 1.0, (flip, corner, k, scores["position"])


def test_photometric_noise_keeps_every_colour_name():
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (5, 3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    augment = CaptionAugment(flip=0.0, translate=0.0, scale=[1.0, 1.0], rotate=0.0, brightness=0.1, contrast=0.1)
    for background in (45 / 255, 110 / 255):
        # half background, half each palette colour; 64 draws of brightness and contrast
        image = torch.full((64, 3, 8, 8), background)
        for c, colour in enumerate(palette):
            image[:, :, c, :4] = colour.view(1, 3, 1).expand(64, 3, 4)
        out, _ = augment((image - mean) / std, torch.zeros(64, 3, dtype=torch.long))
        pixels = out * std + mean
        for c in range(len(palette)):
            seen = pixels[:, :, c, 0]  # (64, 3)
            nearest = torch.cdist(seen, palette).argmin(dim=1)
            assert (nearest == c).all(), (list(COLORS)[c], seen[nearest != c][:2])


def test_bad_augmentation_settings_name_the_key():
    with pytest.raises(ValueError, match=r"data\.augmentation\.flip must be a number in \[0\.0, 1\.0\]"):
        CaptionAugment(flip=1.5)
    with pytest.raises(ValueError, match=r"data\.augmentation\.scale must be \[min, max\]"):
        CaptionAugment(scale=[1.2, 0.9])
    with pytest.raises(ValueError, match="data.augmentation.swaps must be word pairs"):
        CaptionAugment(swaps=[["left"]])
    with pytest.raises(ValueError, match="data.augmentation.rotate"):
        ShapesDataModule(root="unused", augmentation={"rotate": 90})


def test_the_datamodule_augments_training_batches_only(shapes):
    class Trainer:
        training = True

    shapes.images = dataclasses.replace(shapes.images, augment=True)
    shapes.augmentation = CaptionAugment(flip=1.0, **STILL)
    shapes.setup("fit")  # binds the vocabulary
    batch = next(iter(shapes.val_dataloader()))
    shapes.trainer = Trainer()
    images, captions = batch["images"].clone(), batch["captions"].clone()
    out = shapes.on_after_batch_transfer(dict(batch), 0)
    assert torch.allclose(out["images"], images.flip(-1), atol=1e-5)
    left, right = shapes.vocab.word_to_idx["left"], shapes.vocab.word_to_idx["right"]
    assert torch.equal(out["captions"] == right, captions == left)
    Trainer.training = False  # validation, test, prediction: as they are
    kept = shapes.on_after_batch_transfer(dict(batch), 0)
    assert torch.equal(kept["images"], images) and torch.equal(kept["captions"], captions)
    shapes.trainer = None


def test_the_warp_samples_where_affine_grid_says():
    # the sampling grid is written out as broadcast products (a batched matmul with an inner size of 3 is slow on a
    # CPU): it must be the grid torch's affine_grid makes from the same warps
    augment = CaptionAugment(flip=0.5, translate=0.1, scale=[0.8, 1.2], rotate=15.0)
    images = torch.randn(6, 3, 16, 24)
    flipped = torch.tensor([True, False, True, False, False, True])
    torch.manual_seed(0)
    warped = augment._warp(images, flipped)
    torch.manual_seed(0)
    theta = augment.affine(flipped, torch.rand(6, 4))
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)
    torch.testing.assert_close(warped, expected, rtol=0, atol=1e-4)
