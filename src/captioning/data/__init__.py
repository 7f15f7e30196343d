"""Caption data: vocabulary, COCO-format DataModule, and the built-in shapes data set."""

from captioning.data.annotations import load_caption_split
from captioning.data.coco import CocoCaptionsDataModule
from captioning.data.datasets import collate_captions
from captioning.data.shapes import (
    GENERATOR_VERSION,
    ShapesDataModule,
    ensure_shapes_dataset,
    generate_shapes_dataset,
)
from captioning.data.vocab import Vocabulary, pad_captions

__all__ = [
    "GENERATOR_VERSION",
    "CocoCaptionsDataModule",
    "ShapesDataModule",
    "Vocabulary",
    "collate_captions",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "load_caption_split",
    "pad_captions",
]
