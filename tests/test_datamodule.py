"""CocoCaptionsDataModule on official-layout COCO files written by the test, and ShapesDataModule."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from captioning.data import CocoCaptionsDataModule, ShapesDataModule, Vocabulary
from captioning.data.datasets import collate_captions

TRAIN_CAPTIONS = {
    1: ["A dog runs on the grass.", "a brown dog running", "the dog is running fast on green grass today"],
    2: ["A cat sleeps.", "a cat on a sofa"],
    3: ["Two dogs and a cat!", "a dog and a cat play", "animals play"],
}
VAL_CAPTIONS = {
    10: ["a dog on the grass", "A zebra grazes."],
    11: ["a cat sleeping", "a sleepy cat on a sofa", "cat"],
    12: ["a dog"],
}


def _file_name(split, year, image_id):
    # The two official naming schemes.
    return f"COCO_{split}{year}_{image_id:012d}.jpg" if year == "2014" else f"{image_id:012d}.jpg"


def write_coco(root, year, split, captions, modes=("RGB", "L", "RGBA")):
    """Official layout: annotations/captions_<split><year>.json and <split><year>/ with tiny JPEG/PNG files."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    folder = root / f"{split}{year}"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k, (image_id, caps) in enumerate(captions.items()):
        mode = modes[k % len(modes)]
        name = _file_name(split, year, image_id)
        size = (20 + 7 * k, 30 - 3 * k)  # not square: the transform makes it square
        Image.new(mode, size, color=(40 * k, 100, 200, 255)[: len(mode)] if mode != "L" else 90).convert(
            "RGB" if mode == "RGBA" else mode).save(folder / name, format="JPEG")
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for c in caps:
            annotations.append({"id": 1000 * image_id + len(annotations), "image_id": image_id, "caption": c})
    coco = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(coco))


@pytest.fixture(params=["2014", "2017"])
def coco_root(request, tmp_path):
    root = tmp_path / "coco"
    write_coco(root, request.param, "train", TRAIN_CAPTIONS)
    write_coco(root, request.param, "val", VAL_CAPTIONS)
    write_coco(root, request.param, "test", VAL_CAPTIONS)
    return root, request.param


def make_dm(root, year, **kwargs):
    args = {"root": str(root), "year": year, "image_size": 16, "max_length": 5, "min_word_count": 2,
            "batch_size": 4, "num_workers": 0} | kwargs
    return CocoCaptionsDataModule(**args)


def check_captions(captions, max_length):
    assert captions.dtype == torch.long and captions.dim() == 2
    assert captions.shape[1] <= max_length + 2
    assert (captions[:, 0] == 1).all()
    for row in captions.tolist():
        end = row.index(2)
        assert 1 <= end <= max_length + 1
        assert all(t == 0 for t in row[end + 1:])
        assert all(t not in (0, 1, 2) for t in row[1:end])
    lengths = [r.index(2) + 1 for r in captions.tolist()]
    assert max(lengths) == captions.shape[1]  # padded to the longest in the batch, no further


def test_prepare_and_setup_give_train_batches_of_pairs(coco_root):
    root, year = coco_root
    dm = make_dm(root, year)
    dm.prepare_data()
    assert dm.vocab_path == root / f"vocab_train{year}_min2.json"
    assert dm.vocab_path.is_file()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == sum(len(c) for c in TRAIN_CAPTIONS.values())
    seen_ids = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"images", "captions", "image_ids"}
        n = batch["images"].shape[0]
        assert batch["images"].shape == (n, 3, 16, 16) and batch["images"].dtype == torch.float32
        assert batch["image_ids"].shape == (n,) and batch["image_ids"].dtype == torch.long
        assert batch["captions"].shape[0] == n
        check_captions(batch["captions"], max_length=5)
        seen_ids += batch["image_ids"].tolist()
    assert sorted(seen_ids) == sorted(i for i, c in TRAIN_CAPTIONS.items() for _ in c)


def test_vocab_comes_from_train_captions_with_min_count(coco_root):
    root, year = coco_root
    dm = make_dm(root, year)
    dm.prepare_data()
    dm.setup("fit")
    vocab = dm.vocab
    assert vocab.idx_to_word[:4] == ["<NULL>", "<START>", "<END>", "<UNK>"]
    expected = Vocabulary.build([c for caps in TRAIN_CAPTIONS.values() for c in caps], min_word_count=2)
    assert vocab == expected
    assert "zebra" not in vocab  # val-only words stay out
    assert "brown" not in vocab  # seen once in training
    # Caption of a training pair, truncated to max_length words, with <UNK> for rare words.
    ds = dm.datasets["train"]
    assert ds[1]["caption"].tolist() == vocab.encode("a brown dog running", 5)
    assert ds[1]["caption"].tolist()[2] == vocab.unk_id
    assert ds[2]["caption"].tolist() == vocab.encode("the dog is running fast", 5)


def test_val_iterates_each_image_once_with_all_references(coco_root):
    root, year = coco_root
    dm = make_dm(root, year, batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    refs, ids = {}, []
    for batch in dm.val_dataloader():
        assert set(batch) == {"images", "captions", "image_ids", "references"}
        check_captions(batch["captions"], max_length=5)
        for image_id, references, caption in zip(batch["image_ids"].tolist(), batch["references"],
                                                 batch["captions"], strict=True):
            refs[image_id] = references
            assert dm.vocab.decode(caption) == dm.vocab.decode(dm.vocab.encode(references[0], 5))
        ids += batch["image_ids"].tolist()
    assert ids == list(VAL_CAPTIONS)  # once each, in file order (no shuffling)
    assert refs == {i: [c.strip() for c in caps] for i, caps in VAL_CAPTIONS.items()}
    assert dm.references("val") == refs
    assert dm.references("test") == refs


def test_test_stage_and_missing_test_split(coco_root):
    root, year = coco_root
    dm = make_dm(root, year)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == len(VAL_CAPTIONS)
    dm = make_dm(root, year, test_split=None)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="test"):
        dm.test_dataloader()


def test_prepare_data_reuses_the_vocabulary_and_rebuilds_it_when_captions_change(coco_root):
    root, year = coco_root
    dm = make_dm(root, year)
    dm.prepare_data()
    first = dm.vocab_path.stat().st_mtime_ns
    dm.prepare_data()
    assert dm.vocab_path.stat().st_mtime_ns == first
    write_coco(root, year, "train", TRAIN_CAPTIONS | {4: ["a zebra", "a zebra grazes"]})
    dm.prepare_data()
    dm.setup("fit")
    assert "zebra" in dm.vocab


def test_workers_deliver_the_same_batches(coco_root):
    root, year = coco_root
    batches = []
    for workers in (0, 1):
        dm = make_dm(root, year, num_workers=workers)
        dm.prepare_data()
        dm.setup("validate")
        batches.append(list(dm.val_dataloader()))
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["captions"], b["captions"])


def test_images_are_normalised_rgb():
    # A mid-grey image normalises to (0.5 - mean) / std per channel.
    from captioning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, image_transform
    x = image_transform(8)(Image.new("RGB", (10, 6), (128, 128, 128)))
    assert x.shape == (3, 8, 8)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 4, 4], expected, atol=1e-5, rtol=0)


def test_collate_pads_and_keeps_references():
    samples = [{"image": torch.zeros(3, 2, 2), "caption": torch.tensor([1, 5, 2]), "image_id": 7,
                "references": ["a b"]},
               {"image": torch.ones(3, 2, 2), "caption": torch.tensor([1, 2]), "image_id": 9,
                "references": ["c", "d"]}]
    batch = collate_captions(samples)
    assert batch["captions"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["image_ids"].tolist() == [7, 9]
    assert batch["references"] == [["a b"], ["c", "d"]]


# ---------------------------------------------------------------------------------------------- errors
def _message(excinfo):
    return str(excinfo.value)


def test_missing_root_is_named(tmp_path):
    root = tmp_path / "nowhere"
    dm = make_dm(root, "2017")
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    assert str(root) in _message(err) and "data.root" in _message(err)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root))):
        dm.setup("fit")


def test_missing_annotation_file_names_the_expected_path(coco_root):
    root, year = coco_root
    dm = make_dm(root, year, val_split="minival")
    dm.prepare_data()
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    expected = root / "annotations" / f"captions_minival{year}.json"
    assert str(expected) in _message(err) and f"{root}/minival{year}/" in _message(err)


@pytest.mark.parametrize(("content", "problem"), [
    ('{"images": [', "not readable JSON"),
    ("[1, 2]", "JSON list"),
    ('{"images": []}', "'annotations'"),
    ('{"images": [{"id": 1}], "annotations": []}', "file_name"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1}]}',
     "caption"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 2, '
     '"caption": "x"}]}', "image ids not in"),
    # wrongly typed values
    ('{"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []}', "not an integer"),
    ('{"images": [{"id": 1, "file_name": ""}], "annotations": []}', "file_name ''"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}',
     "repeats image id 1"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": {"x": 1}, '
     '"caption": "a"}]}', "must be integers"),
    ('{"images": [{"id": 1e400, "file_name": "a.jpg"}], "annotations": []}', "not an integer"),
])
def test_bad_annotation_files_are_explained(tmp_path, content, problem):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        make_dm(root, "2017").prepare_data()
    assert str(path) in _message(err) and problem in _message(err)


def test_corrupt_vocabulary_file_is_named(coco_root):
    root, year = coco_root
    path = root / "my_vocab.json"
    path.write_text("not json")
    dm = make_dm(root, year, vocab_path=str(path))
    dm.prepare_data()  # an explicit vocab file is used as given
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dm.setup("fit")


def test_image_missing_at_setup_is_listed(coco_root):
    root, year = coco_root
    dm = make_dm(root, year)
    dm.prepare_data()
    missing = [root / f"val{year}" / _file_name("val", year, i) for i in (10, 11)]
    for path in missing:
        path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = _message(err)
    assert "2 of the 3 images of the val split" in message and "data.root" in message
    assert all(str(p) in message for p in missing)


def test_image_vanishing_after_setup_is_skipped_or_named(coco_root):
    root, year = coco_root  # images read from disk each time (a set too large to hold in memory)
    lenient = make_dm(root, year, cache_images=False)
    strict = make_dm(root, year, on_bad_image="fail", cache_images=False)
    for dm in (lenient, strict):
        dm.prepare_data()
        dm.setup("fit")
    missing = root / f"val{year}" / _file_name("val", year, 11)
    missing.unlink()
    with pytest.warns(UserWarning, match=re.escape(str(missing))):
        ids = [i for batch in lenient.val_dataloader() for i in batch["image_ids"].tolist()]
    assert ids == [10, 12]
    assert lenient.bad_images == {"val": [str(missing)]} and lenient.bad_image_count == 1
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        list(strict.val_dataloader())


def test_vocab_before_prepare_data_says_what_to_do(coco_root):
    root, year = coco_root
    with pytest.raises(RuntimeError, match="prepare_data"):
        _ = make_dm(root, year).vocab


def test_bad_constructor_values_are_rejected():
    with pytest.raises(ValueError, match="data.batch_size"):
        CocoCaptionsDataModule(root="x", batch_size=0)


# ---------------------------------------------------------------------------------------------- shapes
def test_shapes_datamodule_generates_then_reuses(tmp_path):
    args = {"root": str(tmp_path / "shapes"), "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 24,
            "batch_size": 8, "num_workers": 0, "progress": False}
    dm = ShapesDataModule(**args)
    assert dm.hparams["num_train"] == 12 and dm.hparams["root"] == args["root"]
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 24, 24)
    check_captions(batch["captions"], max_length=16)
    assert len(dm.datasets["train"]) == 12 * 5 and len(dm.datasets["val"]) == 4
    assert 10 < len(dm.vocab) < 60

    stamp = (tmp_path / "shapes" / "shapes_version.json").stat().st_mtime_ns
    again = ShapesDataModule(**args)
    again.prepare_data()
    again.setup("fit")  # setup on an existing set
    assert (tmp_path / "shapes" / "shapes_version.json").stat().st_mtime_ns == stamp
    assert again.vocab == dm.vocab


def test_shapes_datamodule_runs_in_a_lightning_trainer(tiny_shapes_root, tmp_path):
    """The batch dicts survive Lightning's loop (prepare_data/setup hooks, device transfer)."""

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.val_references = []

        def training_step(self, batch, batch_idx):
            return (batch["images"].mean() + batch["captions"].float().mean()) * self.weight.sum() + self.weight.sum()

        def validation_step(self, batch, batch_idx):
            self.val_references += batch["references"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    import shutil
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes_root, root)
    dm = ShapesDataModule(root=str(root), num_train=20, num_val=5, num_test=5, image_size=32, batch_size=4,
                          num_workers=0, progress=False)
    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.val_references) == 5 and all(len(r) == 5 for r in probe.val_references)


# ---------------------------------------------------------------------------------------------- karpathy
KARPATHY = [  # (cocoid, folder, split, sentences)
    (1, "train2014", "train", ["A dog runs on the grass.", "a brown dog"]),
    (2, "train2014", "train", ["A cat sleeps.", "a cat on a sofa"]),
    (3, "val2014", "restval", ["two dogs play", "a dog and a dog"]),
    (4, "val2014", "restval", ["a red bus", "a bus on a road"]),
    (5, "val2014", "val", ["a zebra grazes", "a zebra"]),
    (6, "val2014", "val", ["a cat sleeping"]),
    (7, "val2014", "test", ["a dog on a sofa"]),
]


def write_karpathy(root, entries=KARPATHY, name="dataset_coco.json"):
    images = []
    for k, (cocoid, folder, split, sentences) in enumerate(entries):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (18 + k, 14), (30 * k, 90, 160)).save(root / folder / filename, format="JPEG")
        images.append({"filepath": folder, "filename": filename, "imgid": k, "cocoid": cocoid, "split": split,
                       "sentids": [], "sentences": [{"raw": s, "tokens": Vocabulary.tokenize(s)} for s in sentences]})
    (root / name).write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


@pytest.mark.parametrize("restval", [True, False])
def test_karpathy_splits_with_and_without_restval(tmp_path, restval):
    root = write_karpathy(tmp_path / "coco")
    dm = make_dm(root, "2014", split_source="karpathy", restval=restval, test_split="test", min_word_count=1)
    dm.prepare_data()
    assert dm.vocab_path.name == f"vocab_karpathy_train{'+restval' if restval else ''}_min1.json"
    dm.setup()
    train_ids = {1, 2, 3, 4} if restval else {1, 2}
    assert {int(i) for i in dm.datasets["train"].split.image_ids} == train_ids
    assert len(dm.datasets["train"]) == 2 * len(train_ids)  # two sentences each
    assert ("bus" in dm.vocab) == restval and "zebra" not in dm.vocab  # vocab from the training images only
    assert dm.references("val") == {5: ["a zebra grazes", "a zebra"], 6: ["a cat sleeping"]}
    assert dm.references("test") == {7: ["a dog on a sofa"]}
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (2, 3, 16, 16) and batch["image_ids"].tolist() == [5, 6]
    restval_image = str(root / "val2014" / "COCO_val2014_000000000003.jpg")  # restval images live in val2014
    assert (restval_image in set(dm.datasets["train"].split.image_paths)) == restval
    seen = sorted(i for b in dm.train_dataloader() for i in b["image_ids"].tolist())
    assert seen == sorted([i for i in train_ids for _ in range(2)])


def test_karpathy_file_option_and_errors(tmp_path):
    root = write_karpathy(tmp_path / "coco", name="splits.json")
    dm = make_dm(root, "2014", split_source="karpathy")
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    assert str(root / "dataset_coco.json") in _message(err) and "data.karpathy_file" in _message(err)
    dm = make_dm(root, "2014", split_source="karpathy", karpathy_file=str(root / "splits.json"), min_word_count=1)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 2

    bad = root / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "cocoid": 1, "split": "minival", "sentences": []}]}))
    with pytest.raises(ValueError) as err:
        make_dm(root, "2014", split_source="karpathy", karpathy_file=str(bad)).prepare_data()
    assert str(bad) in _message(err) and "'minival'" in _message(err)
    bad.write_text('{"images": [')
    with pytest.raises(ValueError) as err:
        make_dm(root, "2014", split_source="karpathy", karpathy_file=str(bad)).prepare_data()
    assert str(bad) in _message(err) and "not readable JSON" in _message(err)
    with pytest.raises(ValueError, match="split_source"):
        make_dm(root, "2014", split_source="flickr")


def test_coco_karpathy_config_instantiates(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    root = write_karpathy(tmp_path / "coco")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["data=coco_karpathy", f"data.root={root}", "data.min_word_count=1",
                                          "data.image_size=16", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    assert dm.split_source == "karpathy" and dm.restval and dm.splits["test"] == "test"
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.datasets["test"]) == 1


def test_the_shared_options_are_one_list_every_source_takes():
    """A source takes its own arguments and the shared options (captioning.data.options): eval.py reads the
    loading ones from its own config and the rest from the checkpoint, so both lists must be the real ones."""
    from omegaconf import OmegaConf

    from captioning.data.options import option_names

    for cls in (CocoCaptionsDataModule, ShapesDataModule):
        arguments = cls.arguments()
        assert set(cls.loading_arguments()) < set(arguments) and set(option_names()) <= set(arguments)
        assert "min_word_count" not in cls.loading_arguments() and "batch_size" in cls.loading_arguments()
    assert ShapesDataModule.arguments()["min_word_count"] == 1 and CocoCaptionsDataModule.arguments()[
        "min_word_count"] == 5
    # every key the data configs set is an argument of their DataModule
    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    from hydra.utils import get_class

    def target(path):  # a config's _target_, or that of the config its defaults list starts from
        node = OmegaConf.to_container(OmegaConf.load(path))
        base = next((d for d in node.get("defaults", []) if isinstance(d, str) and not d.startswith("common")), None)
        return node.get("_target_") or target(conf / f"{base}.yaml")

    for path in conf.glob("*.yaml"):
        node = OmegaConf.to_container(OmegaConf.load(path))
        cls = get_class(target(path))
        assert set(node) - {"_target_", "defaults"} <= set(cls.arguments()), path.name
    # the shared config file is the options' code defaults (the augmentation recipe apart: None in code)
    from captioning.data.options import option_defaults

    shared = OmegaConf.to_container(OmegaConf.load(conf / "common" / "options.yaml"))
    assert set(shared) == set(option_names())
    assert {k: v for k, v in shared.items() if k != "augmentation"} == {
        k: v for k, v in option_defaults().items() if k != "augmentation"}
    with pytest.raises(TypeError, match=r"data\.batchsize is not an option of ShapesDataModule"):
        ShapesDataModule(root="unused", batchsize=8)
    with pytest.raises(ValueError, match=r"data\.min_word_count must be an integer >= 1"):
        CocoCaptionsDataModule(root="unused", min_word_count=0)


def test_a_new_source_needs_only_its_own_arguments(tmp_path):
    """A data source subclass lists what is its own; the options pass through and are saved once."""

    class Folder(CocoCaptionsDataModule):
        OPTION_DEFAULTS = {"batch_size": 8}

        def __init__(self, root: str, caption_file: str = "captions.csv", **options):
            super().__init__(root=root, **options)
            self.caption_file = caption_file
            self.hparams.update(caption_file=caption_file)

    folder = Folder(str(tmp_path), num_workers=0, augment=False)
    assert (folder.loader.batch_size, folder.loader.num_workers, folder.images.augment) == (8, 0, False)
    assert folder.hparams["caption_file"] == "captions.csv" and folder.hparams["batch_size"] == 8
    assert Folder.arguments()["caption_file"] == "captions.csv" and Folder.arguments()["batch_size"] == 8


@pytest.mark.parametrize("augment", [False, True])
def test_images_held_in_memory_are_the_files_tensors(coco_root, augment):
    """cache_images: the same samples as reading the files, decoded once; no DataLoader workers."""
    root, year = coco_root
    kwargs = {"num_workers": 2, "augment": augment}
    held, read = make_dm(root, year, cache_images=True, **kwargs), make_dm(root, year, cache_images=False, **kwargs)
    for dm in (held, read):
        dm.prepare_data()
        dm.setup("fit")
    assert held.datasets["val"].source.decoded is not None and read.datasets["val"].source.decoded is None
    for k in range(len(held.datasets["val"])):
        torch.testing.assert_close(held.datasets["val"][k]["image"], read.datasets["val"][k]["image"], rtol=0, atol=0)
    # augmentation works on whole batches after the loader (CaptionAugment), so the samples agree either way
    for k in range(len(held.datasets["train"])):
        assert torch.equal(held.datasets["train"][k]["image"], read.datasets["train"][k]["image"])
    assert held.train_dataloader().num_workers == 0 and read.train_dataloader().num_workers == 2
    # a batch asked for at once (the DataLoader's __getitems__: images finished as one tensor) is the same samples
    for role in ("train", "val"):
        indices = list(range(len(held.datasets[role])))[::-1]
        together = held.datasets[role].__getitems__(indices)
        for k, sample in zip(indices, together, strict=True):
            one = read.datasets[role][k]
            assert sample.keys() == one.keys() and torch.equal(sample["image"], one["image"])
            assert sample["image_id"] == one["image_id"]
    # the file is not read again
    (root / f"val{year}" / _file_name("val", year, 11)).unlink()
    ids = [i for batch in held.val_dataloader() for i in batch["image_ids"].tolist()]
    assert ids == [10, 11, 12] and held.bad_image_count == 0


def test_auto_holds_a_split_in_memory_only_within_the_budget(coco_root):
    root, year = coco_root
    small, none = make_dm(root, year), make_dm(root, year, image_cache_mb=0)
    for dm in (small, none):
        dm.prepare_data()
        dm.setup("fit")
    assert small.datasets["train"].source.decoded is not None  # a few KB
    assert none.datasets["train"].source.decoded is None
    with pytest.raises(ValueError, match="data.cache_images"):
        make_dm(root, year, cache_images="sometimes")


def test_auto_image_size_follows_the_encoder_and_the_images(tmp_path):
    from captioning.data.transforms import auto_image_size
    from captioning.models.encoder import SmallCNN, TorchvisionEncoder

    def files(size, count=5):
        paths = []
        for k in range(count):
            path = tmp_path / f"{size[0]}x{size[1]}_{k}.png"
            Image.new("RGB", size).save(path)
            paths.append(str(path))
        return paths

    assert auto_image_size(files((64, 48)), stride=16)[0] == 64  # not upscaled to 224
    assert auto_image_size(files((100, 75)), stride=32)[0] == 96  # rounded to the encoder's stride
    size, why = auto_image_size(files((640, 480)), stride=32)
    assert size == 224 and "capped" in why
    assert auto_image_size(files((64, 48)), native=300, stride=32) == (300, "the input size the encoder's "
                                                                           "pretrained weights expect (300 px)")
    assert SmallCNN(channels=(8, 16, 32)).input_size is None and SmallCNN(channels=(8, 16, 32)).downsampling == 8
    assert TorchvisionEncoder("mobilenet_v2").input_size is None  # random init: sized like SmallCNN


def test_auto_image_size_is_resolved_once_and_recorded(coco_root, caplog):
    from captioning.models.encoder import SmallCNN

    root, year = coco_root
    dm = make_dm(root, year, image_size="auto")
    dm.use_encoder(SmallCNN(channels=(8, 16, 32)))
    dm.prepare_data()
    dm.setup("fit")
    # the training images are 20x30, 27x27 and 34x24 px: median longer side 30, the nearest multiple of the
    # encoder's stride 8 is 32
    assert dm.image_size == dm.hparams["image_size"] == 32
    assert dm.datasets["train"][0]["image"].shape == (3, 32, 32)
    assert "data.image_size=auto: 32 px, the training images' own size" in caplog.text
    with pytest.raises(ValueError, match="data.image_size must be an integer >= 1"):
        make_dm(root, year, image_size="big")


def test_pin_memory_auto_pins_only_for_a_gpu(coco_root):
    root, year = coco_root
    dm = make_dm(root, year, pin_memory="auto")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is False  # no trainer on a GPU: nothing to pin for

    class Trainer:
        class strategy:  # noqa: N801 - what Lightning's trainer.strategy gives
            root_device = torch.device("cuda", 0)

    dm.trainer = Trainer()
    assert dm._pin_memory() is True
    dm.trainer = None
    assert make_dm(root, year, pin_memory=True)._pin_memory() is True


def test_encoded_captions_are_cached_keyed_by_captions_vocabulary_and_length(tmp_path, monkeypatch):
    """The training captions' ids are computed once and read back by the next start; any change to the captions,
    the vocabulary or max_length is another key, and the older file is replaced (one per split)."""
    import numpy as np

    from captioning.data.datasets import encode_captions
    from captioning.data.vocab import Vocabulary

    captions = ["A red square.", "a blue circle on the left", "two green stars and a very long tail of words"]
    vocab = Vocabulary.build(captions)
    plain = [vocab.encode(c, 6) for c in captions]
    ids, lengths = encode_captions(captions, vocab, 6, tmp_path)
    assert lengths.tolist() == [len(e) for e in plain]
    assert [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)] == plain and ids.dtype == np.int64
    assert all(row[n:].sum() == 0 for row, n in zip(ids, lengths, strict=True))  # <NULL> padding
    (cached,) = tmp_path.glob("train-*.npz")

    def refuse(*args):
        raise AssertionError("encoded again instead of read from the cache")

    monkeypatch.setattr(Vocabulary, "encode_batch", refuse)
    again, again_lengths = encode_captions(captions, vocab, 6, tmp_path)
    assert np.array_equal(again, ids) and np.array_equal(again_lengths, lengths)
    monkeypatch.undo()
    for changed in ((captions[:2] + ["a red circle"], vocab, 6), (captions, vocab, 5),
                    (captions, Vocabulary.build(captions + ["a star"]), 6)):
        ids2, _ = encode_captions(*changed, tmp_path)
        assert [row[:n].tolist() for row, n in zip(ids2, _, strict=True)] == [changed[1].encode(c, changed[2]) for c in changed[0]]
        (latest,) = tmp_path.glob("train-*.npz")
        assert latest != cached
        cached = latest


# ------------------------------------------------------------------------------------------ captions_per_image
@pytest.mark.parametrize("per_image", [2, 5])
def test_samples_of_several_captions_cover_every_caption_once_with_its_image(coco_root, per_image):
    root, year = coco_root
    dm = make_dm(root, year, captions_per_image=per_image, min_word_count=1)
    dm.prepare_data()
    dm.setup("fit")
    counts = [len(c) for c in TRAIN_CAPTIONS.values()]
    # an image's captions in groups of per_image: 3 captions -> 2 + 1 with per_image=2
    assert len(dm.datasets["train"]) == sum(-(-c // per_image) for c in counts)
    assert dm.train_batch_size == max(1, 4 // per_image)
    expected = {i: sorted(tuple(dm.vocab.encode(c, 5)) for c in caps) for i, caps in TRAIN_CAPTIONS.items()}
    seen: dict[int, list[tuple[int, ...]]] = {i: [] for i in TRAIN_CAPTIONS}
    for batch in dm.train_dataloader():
        assert set(batch) == {"images", "captions", "image_ids", "image_index"}
        images, index = batch["images"], batch["image_index"]
        assert images.shape[0] <= dm.train_batch_size and index.shape == batch["image_ids"].shape
        assert sorted(set(index.tolist())) == list(range(images.shape[0]))  # every image has captions
        check_captions(batch["captions"], max_length=5)
        for row, (image_id, caption) in enumerate(zip(batch["image_ids"].tolist(), batch["captions"].tolist(),
                                                      strict=True)):
            # the caption's image row is that image: the same pixels as a sample of one caption of it gives
            seen[image_id].append(tuple(t for t in caption if t))
            rows_of_it = (batch["image_ids"] == image_id).nonzero().flatten()
            assert torch.equal(index[rows_of_it], index[row].expand(len(rows_of_it)))
    assert {i: sorted(c) for i, c in seen.items()} == expected


def test_a_flipped_image_mirrors_every_caption_of_it():
    from captioning.data.transforms import CaptionAugment

    augment = CaptionAugment(flip=0.5, translate=0.0, scale=[1.0, 1.0])
    augment.bind({"<NULL>": 0, "<START>": 1, "<END>": 2, "<UNK>": 3, "left": 4, "right": 5})
    torch.manual_seed(3)
    images = torch.randn(6, 3, 4, 4)
    index = torch.tensor([0, 0, 1, 1, 1, 2, 3, 4, 4, 5])
    captions = torch.tensor([[1, 4, 2]]).expand(len(index), 3)
    out_images, out_captions = augment(images, captions, index)
    flipped = [bool(torch.allclose(out_images[i], images[i].flip(-1), atol=1e-5)) for i in range(6)]
    assert any(flipped) and not all(flipped)
    assert [row[1] for row in out_captions.tolist()] == [5 if flipped[i] else 4 for i in index.tolist()]
