"""The demo page: drop images, read their captions (greedy or beam), see where the attention model looked.

Built with Gradio (``pip install -e ".[demo]"``) around :class:`captioning.inference.Captioner` — the same
image pipeline and decoding code as ``caption.py``. The model loads once; the requests waiting in the queue
are taken together (Gradio's batching) and the images of those with the same decoding settings decoded as one
batch. A file that cannot be read, or an image over the pixel limit,
gets a line on the page saying so; the server goes on.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data.images import BadImageError
from .inference import Captioner
from .models.decoding import CaptionDecoder
from .visualize import attention_overlay

__all__ = ["DemoCaptioner", "build_demo", "example_images"]

log = logging.getLogger(__name__)
STRATEGIES = ("greedy", "beam")


class DemoCaptioner:
    """What the page's button runs: uploaded files -> an HTML table of captions and attention overlays."""

    def __init__(self, captioner: Captioner, max_length: int = 20, length_penalty: float = 1.0) -> None:
        # beam search ranks by log p per word, as conf/decoding/beam.yaml does (README, "Decoding")
        self.captioner, self.max_length, self.length_penalty = captioner, max_length, length_penalty

    def decoder(self, strategy: str, beam_size: int) -> CaptionDecoder:
        if strategy not in STRATEGIES:
            raise ValueError(f"decoding {strategy!r} is not one of {', '.join(STRATEGIES)}")
        beam = int(beam_size) if strategy == "beam" else 1
        # a beam's other hypotheses are shown under its caption (the n-best list, best first)
        return CaptionDecoder(strategy="beam" if strategy == "beam" else "greedy", max_length=self.max_length,
                              beam_size=beam, n_best=beam if beam > 1 else 1,
                              length_penalty=self.length_penalty if beam > 1 else 0.0)

    def caption(self, files: Sequence[Any] | None, strategy: str = "greedy", beam_size: int = 3) -> tuple[str, list]:
        """One request: its files -> (HTML table, gallery of (overlay, label))."""
        tables, galleries = self.caption_batch([files], [strategy], [beam_size])
        return tables[0], galleries[0]

    def caption_batch(self, files: list, strategies: list, beam_sizes: list) -> tuple[list, list]:
        """Gradio's batched form: the requests waiting in the queue at once, each with its own settings. The images
        of all requests with the same decoding settings are decoded as one batch."""
        requests = [self._read(request_files) for request_files in files]
        settings = [(strategy, int(beam_size) if strategy == "beam" else 1)
                    for strategy, beam_size in zip(strategies, beam_sizes, strict=True)]
        captions: list[list] = [[] for _ in requests]
        for setting in dict.fromkeys(settings):  # each distinct setting once, in the order first asked
            members = [k for k, s in enumerate(settings) if s == setting and requests[k][1]]
            images = [image for k in members for _, image in requests[k][1]]
            if not images:
                continue
            self.captioner.module.set_decoding(self.decoder(*setting))
            decoded = iter(self.captioner(images))
            for k in members:
                captions[k] = [next(decoded) for _ in requests[k][1]]
        tables, galleries = [], []
        for (paths, readable, rows), results in zip(requests, captions, strict=True):
            table, gallery = self._render(paths, readable, rows, results)
            tables.append(table)
            galleries.append(gallery)
        return tables, galleries

    def _read(self, files: Sequence[Any] | None) -> tuple[list[Path], list, dict]:
        """A request's files -> (their paths, the readable (path, image) pairs, {path: (None, why not)})."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        readable, rows = [], {}
        for path in paths:
            try:
                readable.append((path, self.captioner.pipeline.load(path)))
            except BadImageError as error:  # corrupt, not an image, or over the pixel limit (named)
                rows[path] = (None, _for_the_page(str(error), path))
            except (FileNotFoundError, OSError) as error:
                rows[path] = (None, _for_the_page(f"could not be read: {error}", path))
        return paths, readable, rows

    def _render(self, paths: list[Path], readable: list, rows: dict, captions: list) -> tuple[str, list]:
        if not paths:
            return "<p id='captions-message'>Drop one or more images above, then press Caption.</p>", []
        gallery = []
        for (path, image), result in zip(readable, captions, strict=True):
            rows[path] = (result, None)
            if result.attention is not None:
                overlay = attention_overlay(image, result.words, result.attention, title=_display_name(path))
                gallery.append((np.asarray(overlay), f"{_display_name(path)}: {result.text}"))
        return _table([(path, *rows[path]) for path in paths]), gallery


def _display_name(path: Path) -> str:
    return path.name


def _for_the_page(message: str, path: Path) -> str:
    """An error as the page says it: the upload's name instead of the server's temporary path, and the
    server's own setting for the pixel limit."""
    return message.replace(str(path), path.name).replace("data.max_image_pixels", "serve.py max_image_pixels")


def _table(rows: list[tuple[Path, Any, str | None]]) -> str:
    cells = []
    for path, result, error in rows:
        name = html.escape(_display_name(path))
        if error is not None:
            cells.append(f"<tr class='error' data-file='{name}'><td class='file'>{name}</td>"
                         f"<td class='caption' colspan='2'>{html.escape(error)}</td></tr>")
        else:
            others, alternatives = "", getattr(result, "alternatives", None)
            if alternatives and len(alternatives) > 1:
                items = "".join(f"<li>{html.escape(text)} <span class='log-prob'>({lp:.3f})</span></li>"
                                for text, lp in alternatives[1:])
                others = f"<ol class='nbest' start='2' style='margin: 0.3em 0 0 0; opacity: 0.75'>{items}</ol>"
            cells.append(f"<tr data-file='{name}'><td class='file'>{name}</td><td class='caption'>"
                         f"{html.escape(result.text)}{others}</td><td class='log-prob'>{result.log_prob:.3f}</td></tr>")
    return ("<table id='captions' style='table-layout: fixed; width: 100%; word-break: break-word'><thead><tr><th>image</th><th>caption</th><th>log p</th></tr></thead><tbody>"
            + "".join(cells) + "</tbody></table>")


def example_images(folder: Path, count: int, data_root: str | None) -> list[str]:
    """Built-in-set images for the page's examples: the validation split's first, where the data set is on
    disk, else drawn afresh by the generator into ``folder``."""
    if data_root:
        found = sorted(Path(data_root).glob("val*/*.jpg"))[:count]
        if found:
            return [str(p) for p in found]
    from .data.shapes import render_scene, sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        rng = np.random.default_rng([7, k])
        render_scene(sample_scene(rng, 64), 64, rng).save(folder / f"example_{k}.png")
        paths.append(str(folder / f"example_{k}.png"))
    return paths


def build_demo(demo: DemoCaptioner, examples: list[str], default_strategy: str = "greedy",
               default_beam: int = 3, max_batch_size: int = 8) -> Any:
    """The Gradio page."""
    import gradio as gr

    attention = demo.captioner.has_attention
    with gr.Blocks(title="captioning") as page:
        gr.Markdown("# Image captioning\nDrop one or more images (or pick an example), choose how to decode, "
                    "press **Caption**." + (" The attention model shows where it looked for every word." if attention
                                            else ""))
        with gr.Row():
            with gr.Column():
                files = gr.File(file_count="multiple", file_types=["image"], label="images", elem_id="images")
                strategy = gr.Radio(list(STRATEGIES), value=default_strategy, label="decoding", elem_id="strategy")
                beam = gr.Slider(2, 8, value=default_beam, step=1, label="beam size (beam search)", elem_id="beam")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column():
                table = gr.HTML(elem_id="captions-box")
                gallery = gr.Gallery(label="attention: where the model looked for each word", visible=attention,
                                     elem_id="attention", columns=1, height="auto", object_fit="contain")
        if examples:
            gr.Examples(examples=[[[p]] for p in examples], inputs=[files], label="images of the built-in set")
        button.click(demo.caption_batch, inputs=[files, strategy, beam], outputs=[table, gallery], batch=True,
                     max_batch_size=max_batch_size)
    return page
