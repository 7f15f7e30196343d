"""What eval.py does besides composing: the data config a checkpoint was trained with, and the table.

The checkpoint records its DataModule's class and arguments (``datamodule_target`` and Lightning's
``datamodule_hyper_parameters``). :func:`checkpoint_data_config` rebuilds the data config from them, so a
checkpoint alone is enough to evaluate it; the arguments given on the command line (``data.root=`` where the
data moved) and the DataModule's ``loading_arguments()`` (batch size, workers...) stay the eval config's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from .progress import to_log_file

__all__ = ["METRIC_ORDER", "checkpoint_data_config", "command_line_data_group", "command_line_data_keys",
           "data_from_checkpoint", "merge_data_config", "nbest_report", "print_table"]

log = logging.getLogger(__name__)

METRIC_ORDER = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")


def _command_line() -> list[Any]:
    if not HydraConfig.initialized():
        return []
    return OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))


def command_line_data_keys() -> set[str]:
    """The ``data.<key>`` names set on the command line (they win over the checkpoint's values)."""
    return {o.key_or_group.split(".")[1] for o in _command_line() if o.key_or_group.startswith("data.")}


def command_line_data_group() -> str | None:
    """The ``data=<option>`` given on the command line, if any."""
    return next((str(o.value()) for o in _command_line() if o.key_or_group == "data"), None)


def data_from_checkpoint(data: DictConfig, saved: Mapping[str, Any], explicit: set[str]) -> DictConfig:
    """The DataModule config the checkpoint was trained with: its ``_target_`` and values, with this
    config's loader settings (batch size, workers...) and the ``data.*`` given on the command line."""
    target = saved["_target_"]
    params, loader = _parameters(target), _loader_arguments(target)
    rebuilt = OmegaConf.create({"_target_": target})
    for key in params:
        if key in data and (key in loader or key in explicit):
            rebuilt[key] = data[key]
    unknown = explicit - set(params)
    if unknown:
        raise ValueError(
            f"data.{sorted(unknown)[0]} is not an argument of the checkpoint's DataModule {target}; its "
            f"arguments are {', '.join(params)}."
        )
    return rebuilt


def _arguments(target: str) -> dict[str, Any]:
    """The DataModule's constructor arguments and their defaults, its shared options included (``arguments()``)."""
    cls = get_class(target)
    if hasattr(cls, "arguments"):
        return cls.arguments()
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _parameters(target: str) -> list[str]:
    return list(_arguments(target))


def _loader_arguments(target: str) -> set[str]:
    """The DataModule's arguments that say how to load (``loading_arguments()``), not what the data is."""
    cls = get_class(target)
    return set(cls.loading_arguments()) if hasattr(cls, "loading_arguments") else set()


def merge_data_config(data: DictConfig, saved: Mapping[str, Any], explicit: set[str], group: str) -> list[str]:
    """Set the data-defining arguments of ``data`` from the checkpoint's DataModule hyperparameters, in place.

    Only arguments of ``data._target_``'s constructor are taken, except the loader settings and the keys
    in ``explicit``. Returns the keys taken. Raises ValueError when the checkpoint's DataModule was
    another kind (the target needs arguments it never had), naming the group to pass instead.
    """
    params, loader = _parameters(data._target_), _loader_arguments(data._target_)
    wanted = [p for p in params if p not in loader and p not in explicit]
    # arguments newer than the checkpoint: it was trained as their default says
    added = set(getattr(get_class(data._target_), "ADDED_ARGUMENTS", ()))
    defaults = _arguments(data._target_)
    saved = {**{k: defaults[k] for k in added if k not in saved and k in defaults}, **saved}
    missing = [p for p in wanted if p not in saved]
    if missing:
        raise ValueError(
            f"The checkpoint's DataModule does not fit data={group} ({data._target_}): it has no "
            f"{', '.join(missing)}. It was trained with another data group; pass that one (e.g. data=coco "
            "data.root=...), or data_from_checkpoint=false with the data.* it was trained with."
        )
    with open_dict(data):
        for key in wanted:
            data[key] = saved[key]
    return wanted


def nbest_report(nbest: Mapping[int, list[tuple[str, float]]], result: Any) -> dict[str, Any]:
    """What the n-best lists hold, judged like the predictions: per rank the grounded scores of the rank-k
    captions (where the data knows what the images show), the share of images with at least one true caption in
    their list (the list's oracle), the distinct captions per list and the distinct bigrams within a list
    (Distinct-2, Li et al. 2016: how different the alternatives are, the point of diverse beam search)."""
    size = max((len(entries) for entries in nbest.values()), default=0)
    distinct, distinct_2 = [], []
    for entries in nbest.values():
        texts = [text for text, _ in entries]
        distinct.append(len(set(texts)) / len(texts) if texts else 0.0)
        bigrams = [tuple(words[i:i + 2]) for words in (t.split() for t in texts) for i in range(len(words) - 1)]
        distinct_2.append(len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
    report: dict[str, Any] = {"size": size, "distinct_captions": sum(distinct) / max(len(distinct), 1),
                              "distinct_2": sum(distinct_2) / max(len(distinct_2), 1), "by_rank": []}
    any_true: dict[int, bool] = {}
    for rank in range(size):
        captions = {i: entries[rank][0] for i, entries in nbest.items() if len(entries) > rank}
        report["by_rank"].append({"rank": rank + 1, "images": len(captions), **result.ground(captions)})
        for image_id, verdict in result.verdicts(captions).items():
            any_true[image_id] = any_true.get(image_id, False) or bool(verdict.correct)
    if any_true:
        report["any_true"] = sum(any_true.values()) / len(any_true)
    return report


def print_table(fast: Mapping[str, float], official: Mapping[str, float] | None, title: str,
                grounding: Mapping[str, float] | None = None) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("fast (validation code)", justify="right")
    table.add_column("official (pycocoevalcap)", justify="right")
    for name in METRIC_ORDER:
        if name in fast or (official and name in official):
            cells = [f"{m[name]:.4f}" if m and name in m else "-" for m in (fast, official)]
            table.add_row(name, *cells)
    # grounded in the image: computed by the validation code only
    for name, value in (grounding or {}).items():
        table.add_row(f"grounding/{name}", f"{value:.4f}", "-")
    console = Console(record=True)
    console.print(table)
    to_log_file(console.export_text())


def checkpoint_data_config(cfg: DictConfig, saved: Mapping[str, Any], source: str) -> None:
    """Set ``cfg.data`` to the data the checkpoint was trained with, in place (see the module docstring).

    ``saved``: the checkpoint's DataModule config (:func:`captioning.module.load_checkpoint`); ``source``
    names the checkpoint in messages. A ``data=<group>`` on the command line keeps that group's DataModule; when it
    is another kind than the checkpoint's, it is another data set (an evaluation-only one, say), taken as given but
    for the image size the model was trained at.
    """
    if not saved:
        log.warning("%s holds no DataModule hyperparameters; using the data config as given.", source)
        return
    group = HydraConfig.get().runtime.choices.get("data", "?") if HydraConfig.initialized() else "?"
    explicit = command_line_data_keys()
    target = saved.get("_target_")
    if target and target != cfg.data._target_ and command_line_data_group() is None:
        # trained with another data group (data=coco): the checkpoint says which, data.* still win
        with open_dict(cfg):
            cfg.data = data_from_checkpoint(cfg.data, saved, explicit)
        group = f"{target.rpartition('.')[2]} (from the checkpoint)"
    elif target and target != cfg.data._target_:
        # data=<another kind> on the command line: another data set than the model's (an evaluation-only set, a
        # cross-data-set score). It is taken as given, captioned with the model's vocabulary (eval.py) at the image
        # size the model was trained at.
        if "image_size" in cfg.data and "image_size" not in explicit and "image_size" in saved:
            cfg.data.image_size = saved["image_size"]
        log.info("Evaluating on data=%s, not the data set the checkpoint was trained on (%s): its data.* as given, "
                 "image_size %s from the checkpoint.", group, target, cfg.data.get("image_size"))
        return
    merge_data_config(cfg.data, saved, explicit, group)
