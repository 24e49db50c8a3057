"""Each job's TensorBoard image (its test predictions against the truth), drawn in parallel.

Drawing and PNG-encoding one image takes about 70 ms (figures.pred_vs_true_rgb), which a
fused fit of 40 jobs would pay 40 times in series after testing. With several jobs, a few
forked worker processes draw them (they start with the test results in memory) while this
process writes the jobs' files; a lone job's image, or any where fork is unavailable, is
drawn here, exactly the same.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Hashable, Iterator
from typing import Any

import numpy as np

from housing_reg.forking import default_signals, workers

TAG = "test/pred_vs_true"
Request = tuple[str, np.ndarray, np.ndarray, str, str]  # title, true, pred, target, unit


def summary_bytes(request: Request) -> bytes:
    """One image as a serialized TensorBoard Summary, as SummaryWriter.add_image makes it but
    for the PNG's compression: zlib's fastest level, a third of the default's time for 7%
    more bytes."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    from housing_reg.figures import pred_vs_true_rgb

    title, true, pred, target, unit = request
    rgb = pred_vs_true_rgb(true, pred, title, target, unit)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG", compress_level=1)
    height, width, channels = rgb.shape
    image = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue()
    )
    return Summary(value=[Summary.Value(tag=TAG, image=image)]).SerializeToString()


class Images:
    """{key: request} drawn in order as workers finish; `get(key)` waits for that one."""

    def __init__(self, requests: dict[Hashable, Request]):
        if requests:  # matplotlib imported once, here, and inherited by the workers
            import housing_reg.figures  # noqa: F401

        self.keys = iter(requests)
        self.done: dict[Hashable, bytes] = {}
        n = workers(len(requests))
        self.pool = multiprocessing.get_context("fork").Pool(n, default_signals) if n else None
        values = list(requests.values())
        self.results: Iterator[bytes] = (
            self.pool.imap(summary_bytes, values) if self.pool else map(summary_bytes, values)
        )

    def get(self, key: Hashable) -> bytes:
        while key not in self.done:
            self.done[next(self.keys)] = next(self.results)
        return self.done.pop(key)

    def __enter__(self) -> Images:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()  # every image taken: the workers exit
            else:
                self.pool.terminate()  # the test stage failed: no image is needed
            self.pool.join()
