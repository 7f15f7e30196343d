"""Images stored inside Arrow files (a Hugging Face dataset's own files), named like files.

A Hugging Face dataset keeps its images as bytes in memory-mapped Arrow files (``save_to_disk``'s folder, or the
``datasets`` cache that ``load_dataset`` converts parquet into). Rather than copying 123k images out into files
on the first start, a split names each image by where it is: ``<file.arrow>#<column>=<row>``. Everything that
takes an image path takes such a name (:func:`~captioning.data.images.load_image`, the image-size probe, the
feature cache's keys, the missing-image check); each process maps a file once and reads a row's bytes without
copying the rest.
"""

from __future__ import annotations

import io
import os
import re
from bisect import bisect_right
from typing import Any

__all__ = ["arrow_file", "arrow_row_name", "image_rows", "image_source", "read_arrow_row"]

_NAME = re.compile(r"^(?P<file>.+\.arrow)#(?P<column>[^#=/\\]+)=(?P<row>\d+)$")
_TABLES: dict[str, tuple[Any, list[int], Any]] = {}  # file, column, version -> _column's answer


def arrow_row_name(file: str, column: str, row: int) -> str:
    """The name of row ``row``'s image in column ``column`` of the Arrow file ``file``."""
    return f"{file}#{column}={row}"


def _parse(path: str) -> tuple[str, str, int] | None:
    match = _NAME.match(path) if "#" in path else None
    return (match["file"], match["column"], int(match["row"])) if match else None


def arrow_file(path: str) -> str:
    """The file that holds ``path``'s bytes: the Arrow file for a row's name, else ``path`` itself."""
    parsed = _parse(str(path))
    return parsed[0] if parsed else str(path)


def _column(file: str, column: str) -> tuple[Any, list[int], Any]:
    """The column of ``file`` mapped once per process: (its chunks, their first rows, its type; None when the file
    has no such column). Raises OSError when the file cannot be read."""
    import pyarrow as pa

    stat = os.stat(file)
    key = f"{file}#{column}#{stat.st_size}:{stat.st_mtime_ns}"  # a file written again is mapped again
    if key not in _TABLES:
        with pa.memory_map(file) as source:  # datasets writes the IPC stream format; read_all maps, never copies
            table = pa.ipc.open_stream(source).read_all()
        if table.schema.get_field_index(column) < 0:
            _TABLES[key] = ([], [], None)
        else:
            chunks = table.column(column).chunks
            starts = [0] * len(chunks)
            for k in range(1, len(chunks)):
                starts[k] = starts[k - 1] + len(chunks[k - 1])
            _TABLES[key] = (chunks, starts, table.schema.field(column).type)
    return _TABLES[key]


def image_rows(file: str, column: str) -> int | None:
    """How many rows ``file`` has when its ``column`` holds image bytes (an ``Image`` feature's struct of bytes and
    path); None when it does not, or the file is not an Arrow stream that can be read."""
    import pyarrow as pa

    try:
        chunks, _, kind = _column(file, column)
    except (OSError, pa.ArrowException):
        return None
    if not (kind is not None and pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0):
        return None
    return sum(len(chunk) for chunk in chunks)


def _read(path: str, file: str, column: str, row: int) -> bytes:
    try:
        chunks, starts, _ = _column(file, column)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"Image {path}: the Arrow file {file} is gone (a cleared Hugging Face cache?); "
                                "the next start reads the dataset again") from err
    k = bisect_right(starts, row) - 1
    if k < 0 or row - starts[k] >= len(chunks[k]):
        raise ValueError(f"Image {path}: row {row} is past the end of {file} (it was written again since?)")
    cell = chunks[k][row - starts[k]].as_py()
    data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
    if not data:
        raise ValueError(f"Image {path}: the row holds no image bytes")
    return data


def read_arrow_row(path: str) -> bytes:
    """The image bytes a row's name points to.

    Raises FileNotFoundError when the Arrow file is gone, ValueError when the row has no image bytes or is past
    the file's end (each naming the file and the row).
    """
    parsed = _parse(path)
    if parsed is None:
        raise ValueError(f"{path} does not name a row of an Arrow file (<file.arrow>#<column>=<row>).")
    return _read(path, *parsed)


def image_source(path: str) -> str | io.BytesIO:
    """What ``PIL.Image.open`` takes for ``path``: the path of a file, the bytes of an Arrow row."""
    path = str(path)
    parsed = _parse(path)
    return io.BytesIO(_read(path, *parsed)) if parsed else path
