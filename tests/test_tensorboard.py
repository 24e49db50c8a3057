"""TensorBoard, served for real on loopback, shows a sweep at a glance: train and test
scalars against the optimizer step (no `epoch` card), one image per run at the last step,
and the HPARAMS table."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from urllib.error import URLError
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

from conftest import job_dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cli
def test_tensorboard_shows_every_scalar_by_optimizer_step(readme_sweep):
    """On the README's sweep (conftest.readme_sweep): four runs, two epochs each."""
    runs = [j.name for j in job_dirs(readme_sweep.sweep)]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(readme_sweep.sweep)]
        + ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(path: str, **query: str):
        url = f"http://127.0.0.1:{port}/data/{path}" + (f"?{urlencode(query)}" if query else "")
        with urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline, tags = time.monotonic() + 90, {}
        while time.monotonic() < deadline:  # until both runs are loaded, whole
            try:
                tags = get("plugin/scalars/tags")
                images = get("plugin/images/tags")
                if sorted(tags) == runs and sorted(images) == runs:
                    break
            except (URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.5)
        assert sorted(tags) == runs, tags
        steps_per_epoch = 404  # batch size 1
        for run in runs:
            assert sorted(tags[run]) == ["test/mae", "test/mse", "train/loss", "train/mae"]
            for tag, steps in {
                "train/mae": [steps_per_epoch, 2 * steps_per_epoch],
                "train/loss": [steps_per_epoch, 2 * steps_per_epoch],
                "test/mae": [2 * steps_per_epoch],
            }.items():
                points = get("plugin/scalars/scalars", run=run, tag=tag)
                assert [step for _, step, _ in points] == steps, (run, tag)
            image = get("plugin/images/images", run=run, tag="test/pred_vs_true", sample="0")
            assert [i["step"] for i in image] == [2 * steps_per_epoch]
        assert get("plugins_listing")["hparams"]["enabled"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.unit
def test_a_run_without_a_logger_writes_its_results_and_no_tensorboard_run(make_cfg, tmp_path):
    """`~logger` removes the logger group: the job trains and writes its files, no event file."""
    from housing_reg.train import train

    metrics = train(make_cfg("~logger", "trainer.max_epochs=1"))
    assert metrics["status"] == "ok"
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "predictions.csv").is_file()
    assert not list(tmp_path.rglob("events.out.tfevents*"))


@pytest.mark.unit
def test_images_drawn_by_workers_are_those_drawn_here():
    """A fit's jobs' images come from forked workers (images.py), taken in any order; each is
    byte for byte the image this process draws for the same request."""
    import numpy as np

    from housing_reg.forking import workers
    from housing_reg.images import Images, summary_bytes

    rng = np.random.default_rng(0)
    true = rng.uniform(5, 50, 102).astype(np.float32)
    requests = {
        k: (f"boston: {k}", true, true + rng.normal(0, s, (r, 102)).astype(np.float32), "MEDV", "")
        for k, s, r in (("a", 1, 1), ("b", 5, 3), ("c", 0, 1))
    }
    with Images(requests) as images:
        if workers(3):
            assert images.pool is not None
        got = {k: images.get(k) for k in ("c", "a", "b")}
    assert got == {k: summary_bytes(r) for k, r in requests.items()}
    assert len(set(got.values())) == 3


@pytest.mark.unit
def test_pred_vs_true_image_drawn_again_has_a_new_figures_pixels():
    """figures.pred_vs_true_rgb draws each job's image on one figure per process, emptied and
    filled again: every image is pixel for pixel a new figure's, whatever the images before it
    (ranges from 0.01 to 1000 wide, negative values, a flat line, labels with and without
    units)."""
    import numpy as np

    from housing_reg.figures import figure_rgb, pred_vs_true_figure, pred_vs_true_rgb

    rng = np.random.default_rng(1)
    requests = []
    for i, width in enumerate((1000.0, 1.0, 0.01, 50.0, 3.0, 1000.0)):
        true = rng.uniform(-0.5, 1.0, 102) * width
        pred = np.full(102, 0.5) if i == 3 else true + rng.normal(0, 0.1 * width, (1 + i % 3, 102))
        title = f"job {i}: test MAE {i * 1.7:.2f}"
        requests.append((true, pred, title, "MEDV" * (i % 2), "$1000s"))
    for request in requests:
        again, new = pred_vs_true_rgb(*request), figure_rgb(pred_vs_true_figure(*request))
        assert again.shape == new.shape and np.array_equal(again, new), request[2]
