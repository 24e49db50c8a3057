"""Fused sweeps: jobs that differ only in seed, head, fold or target scaling train as one
fit, and every job's directory holds exactly what its lone run writes, numbers included."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from housing_reg.fit import fit_threads, head_elements
from housing_reg.kernels import GRAIN
from housing_reg.prepare import prepare
from housing_reg.runs import run_jobs
from housing_reg.train import train, train_jobs

from conftest import FAST, compose_cfg, job_dirs, need, read_metrics, run_cli, scalars

# heads x seeds x folds x scalings, in 2 epochs: 24 jobs, 3 fits (the folds' sizes differ)
GRID = (
    "head=relu,sigmoid",
    "seed=3,4",
    "data.num_folds=3",
    "data.fold=0,1,2",
    "data.target_scaling=none,minmax",
)
SAME = ("replicas.csv", "predictions.csv")
QUICK = (*FAST, "data.batch_size=32")  # 13 steps an epoch


def table(stdout: str) -> list[str]:
    """The sweep's summary: stdout without the log lines."""
    return [line for line in stdout.splitlines() if not line.startswith(("[", "\t"))]


def files_of(job: Path) -> set[str]:
    return {str(p.relative_to(job)) for p in job.rglob("*") if "events" not in p.name}


@pytest.mark.cli
def test_fused_jobs_equal_unfused_jobs_one_by_one(tmp_path: Path):
    # The fused fits on 2 threads (train.fit_threads), whatever the cores; the lone jobs on 1.
    threads = {"OMP_NUM_THREADS": "2"}
    fused = run_cli("-m", *GRID, *FAST, "hydra.sweep.dir=fused", cwd=tmp_path, env=threads)
    plain = run_cli("-m", *GRID, *FAST, "fuse.enabled=false", "hydra.sweep.dir=plain", cwd=tmp_path)
    out = fused.stderr + fused.stdout
    assert "group 0: 24 jobs, 24 models, one task" in out
    assert "fit 1 of 2: 16 jobs, 16 models" in out  # folds 0 and 1: 135 training rows
    assert "fit 2 of 2: 8 jobs, 8 models" in out  # fold 2: 134
    # The same table, the same job directories, numbered as Hydra numbers them.
    assert table(fused.stdout) == table(plain.stdout.replace("plain", "fused"))
    a, b = job_dirs(tmp_path / "fused"), job_dirs(tmp_path / "plain")
    assert [j.name for j in a] == [j.name for j in b] and len(a) == 24
    # The group's task trains the configs the sweeper composed, pickled in its group file.
    group = pickle.loads((tmp_path / "fused/.fused/0/group.pkl").read_bytes())
    assert [int(g.hydra.job.num) for g in group] == list(range(24))
    assert [str(g.head.name) for g in group] == [read_metrics(j)["head"] for j in a]
    for x, y in zip(a, b, strict=True):
        assert files_of(x) == files_of(y), x.name
        for name in SAME:
            assert (x / name).read_text() == (y / name).read_text(), (x.name, name)
        mx, my = read_metrics(x), read_metrics(y)
        for key in ("train/mae", "val/mae", "test/mae", "test/mse", "history", "seed", "head"):
            assert mx[key] == my[key], (x.name, key)
        assert mx["config"]["output_dir"] == str(x.absolute())
        # Their own config and overrides: the same but for the unfused sweep's fuse.enabled.
        cx, cy = ((j / ".hydra/config.yaml").read_text() for j in (x, y))
        assert cx == cy.replace("enabled: false", "enabled: true")
        ox, oy = ((j / ".hydra/overrides.yaml").read_text() for j in (x, y))
        assert ox == oy.replace("- fuse.enabled=False\n", "")
        # Hydra's own record of the job, composed by Hydra for the unfused one; the fused
        # sweeper derives most jobs from a composed one (fused.py: derive).
        hx, hy = ((j / ".hydra/hydra.yaml").read_text() for j in (x, y))
        assert hx == re.sub(r"\n *- fuse.enabled=False\n", "\n", hy).replace("plain", "fused")
        sx, sy = scalars(x), scalars(y)
        assert sx == sy, x.name
        ca = torch.load(x / "checkpoints/last.ckpt", weights_only=True)
        cb = torch.load(y / "checkpoints/last.ckpt", weights_only=True)
        assert ca["hyper_parameters"] == cb["hyper_parameters"]
        assert ca["state_dict"].keys() == cb["state_dict"].keys()
        for k, v in ca["state_dict"].items():
            assert torch.equal(v, cb["state_dict"][k]), (x.name, k)
        # Each tensor saved alone: a view into the fit's tensors would save every job's.
        saved = [*ca["state_dict"].values()]
        saved += [
            v for o in ca["optimizer_states"] for st in o["state"].values() for v in st.values()
        ]
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in saved)
        assert (
            ca["callbacks"]["JobRecorder"]["history"] == cb["callbacks"]["JobRecorder"]["history"]
        )


@pytest.mark.unit
def test_replicas_per_job_and_the_cap(make_cfg, tmp_path: Path, caplog):
    """model.replicas=K gives K replicas per job; fuse.max_replicas splits bigger fits (the
    sweeper's groups too: test_fused_groups_run_under_another_launcher)."""
    caplog.set_level(logging.INFO, logger="housing_reg.train")
    args = ("model.replicas=2", *FAST, "data.batch_size=32", "fuse.max_replicas=4")
    heads = ("head=none", "head=tanh", "head=relu")
    outcomes = train_jobs([make_cfg(h, *args, output_dir=tmp_path / h) for h in heads])
    assert all(isinstance(m, dict) for m in outcomes)
    fits = [m.rsplit(",", 1)[0] for m in caplog.messages if m.startswith("fit ")]
    assert fits == ["fit 1 of 2: 2 jobs, 4 models", "fit 2 of 2: 1 jobs, 2 models"]
    lone = train(make_cfg("head=tanh", *args, output_dir=tmp_path / "lone"))
    job = tmp_path / "head=tanh"
    assert read_metrics(job)["test/mae"] == lone["test/mae"]
    assert np.array_equal(
        np.load(job / "replicas.npz")["test_pred"],
        np.load(tmp_path / "lone" / "replicas.npz")["test_pred"],
    )


@pytest.mark.unit
def test_groups_keep_order_and_split_at_the_cap():
    """fuse.groups: equal keys together in order of first appearance, each group at most cap
    models in all, an item bigger than cap alone."""
    from housing_reg.fuse import groups

    items = [("a", 2), ("b", 1), ("a", 2), ("a", 1), ("b", 5), ("a", 3), ("b", 1), ("a", 1)]
    got = groups(items, lambda i: i[0], lambda i: i[1], cap=4)
    assert got == [
        [("a", 2), ("a", 2)],
        [("a", 1), ("a", 3)],
        [("a", 1)],
        [("b", 1)],
        [("b", 5)],
        [("b", 1)],
    ]


@pytest.mark.unit
def test_a_diverging_job_fails_alone_and_the_others_train_on(make_cfg, tmp_path: Path, caplog):
    """At lr=1e6 the unbounded head=none diverges in its first epoch, while sigmoid and tanh
    (bounded, saturated) stay finite: one fit, one failed job (recorded as a fused sweep's
    task records it, cli.run_jobs), the others their lone runs."""
    caplog.set_level(logging.INFO, logger="housing_reg.train")
    heads = ("head=none", "head=sigmoid", "head=tanh")
    cfgs = [make_cfg(h, "optim.lr=1e6", *QUICK, output_dir=tmp_path / h) for h in heads]
    run_jobs(train_jobs, cfgs)
    assert any(m.startswith("fit 1 of 1: 3 jobs, 3 models") for m in caplog.messages)
    bad, *good = (tmp_path / h for h in heads)
    failure = json.loads((bad / "failure.json").read_text())
    assert failure["status"] == "failed" and "diverged" in failure["error"]
    assert not (bad / "metrics.json").exists()
    assert all(read_metrics(g)["status"] == "ok" for g in good)
    for head, x in zip(heads[1:], good, strict=True):
        y = tmp_path / f"lone {head}"
        train(make_cfg(head, "optim.lr=1e6", *QUICK, output_dir=y))
        assert (x / "replicas.csv").read_text() == (y / "replicas.csv").read_text()
        assert read_metrics(x)["history"] == read_metrics(y)["history"]
        assert scalars(x) == scalars(y)
    with pytest.raises(FloatingPointError, match="diverged"):
        train(make_cfg(heads[0], "optim.lr=1e6", *QUICK, output_dir=tmp_path / "lone none"))


@pytest.mark.unit
def test_one_jobs_bad_settings_are_reported_before_training(make_cfg, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="housing_reg.train")
    folds = ("data.fold=0", "data.fold=7")
    cfgs = [make_cfg(f, "data.num_folds=4", *QUICK, output_dir=tmp_path / f) for f in folds]
    run_jobs(train_jobs, cfgs)
    good, bad = (tmp_path / f for f in folds)
    assert (good / "metrics.json").exists()
    assert "data.fold=7" in json.loads((bad / "failure.json").read_text())["error"]
    log = caplog.messages
    refused = next(i for i, m in enumerate(log) if m.startswith("job data.fold=7 will not train"))
    assert "data.fold=7" in log[refused][len("job data.fold=7 will not train") :]
    assert refused < next(i for i, m in enumerate(log) if m.startswith("fit 1 of 1: 1 jobs"))


@pytest.mark.unit
def test_a_derived_job_config_is_the_one_hydra_composes():
    """The sweeper composes the first job of each shape with Hydra and derives the others
    (fused.derive: the job's values set with OmegaConf.update, its task overrides and
    override_dirname written as Hydra writes them): every key equals Hydra's own
    composition, hydra's included, for values of several types and an excluded key."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hydra_plugins.housing_reg_launcher.fused import derive

    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        sweep = ["head=relu,tanh", "seed=3,4", "optim.lr=0.001,0.01", "hydra.job.chdir=false"]
        master = loader.load_configuration("config", sweep, RunMode.MULTIRUN)
        first = ["head=tanh", "seed=3", "optim.lr=0.001", "fuse.enabled=true"]
        composed = loader.load_sweep_config(master, first)
        for job in (
            ["head=tanh", "seed=4", "optim.lr=0.01", "fuse.enabled=false"],
            ["head=tanh", "seed=3", "optim.lr=1e-2", "fuse.enabled=true"],
        ):
            parsed = OverridesParser.create().parse_overrides(job)
            derived = derive(pickle.dumps(composed), parsed[1:], parsed, master)
            hydras = loader.load_sweep_config(master, job)
            assert OmegaConf.to_container(derived) == OmegaConf.to_container(hydras), job
            assert derived.hydra.job.override_dirname == hydras.hydra.job.override_dirname


@pytest.mark.cli
def test_fused_groups_run_under_another_launcher(tmp_path: Path):
    """hydra/launcher=parallel runs each task in a child forked from the sweep's process: the
    sweeper's groups, split at fuse.max_replicas (two tasks of two jobs), and the plain jobs
    of an unfused sweep (four tasks) give the numbers of one fused fit under the basic
    launcher (here in-process: train_jobs, as the basic launcher's task runs it)."""
    args = ("-m", "head=none,relu", "data.target_scaling=none,standard", "model.replicas=2")
    args = (*args, *QUICK)
    parallel = "hydra/launcher=parallel"
    capped = run_cli(*args, parallel, "fuse.max_replicas=4", "hydra.sweep.dir=l", cwd=tmp_path)
    out = capped.stderr + capped.stdout
    assert "group 0: 2 jobs, 4 models, one task" in out
    assert "group 2: 2 jobs, 4 models, one task" in out
    assert "Launching 2 jobs, 2 at a time in forked processes" in out
    plain = run_cli(*args, parallel, "fuse.enabled=false", "hydra.sweep.dir=u", cwd=tmp_path)
    assert "Launching 4 jobs, 2 at a time in forked processes" in plain.stderr + plain.stdout
    # In this process, the one fit of all four jobs that the basic launcher runs.
    basic = [tmp_path / "b" / str(i) for i in range(4)]
    grid = [(h, s) for h in ("head=none", "head=relu") for s in ("none", "standard")]
    cfgs = [
        compose_cfg(h, f"data.target_scaling={s}", *args[3:], output_dir=b)
        for (h, s), b in zip(grid, basic, strict=True)
    ]
    assert all(isinstance(m, dict) for m in train_jobs(cfgs))
    sweeps = [job_dirs(tmp_path / d) for d in ("l", "u")] + [basic]
    assert [len(s) for s in sweeps] == [4, 4, 4]
    for x, y, z in zip(*sweeps, strict=True):
        assert (x / "replicas.csv").read_text() == (z / "replicas.csv").read_text(), x.name
        assert (y / "replicas.csv").read_text() == (z / "replicas.csv").read_text(), y.name
        assert (
            read_metrics(x)["history"] == read_metrics(y)["history"] == read_metrics(z)["history"]
        )


@pytest.mark.unit
def test_lone_train_is_a_fit_of_one_job(make_cfg, tmp_path: Path):
    m = train(make_cfg(*FAST, output_dir=tmp_path / "a"))
    assert m["replicas"] == 1 and (tmp_path / "a/checkpoints/last.ckpt").is_file()


@pytest.mark.cli
def test_ctrl_c_stops_the_group_and_resume_continues_each_job(tmp_path: Path):
    """Ctrl-C in epoch 2 of 3 stops the fused group: every job is recorded as interrupted
    with its epoch-1 checkpoint, and resume=true finishes each job to the numbers of a sweep
    that was never interrupted."""
    args = ("-m", "head=none,tanh", "seed=0,5", "trainer.max_epochs=3", *FAST[1:])
    args = (*args, "data.batch_size=32")
    by_num = "hydra.sweep.subdir=${hydra.job.num}"  # the same dirs without the interrupt
    ctrl_c = ("+callbacks.interrupt._target_=interrupt.InterruptAt", "+callbacks.interrupt.epoch=1")
    env = {"PYTHONPATH": str(Path(__file__).parent)}  # tests/interrupt.py
    cut = run_cli(*args, by_num, *ctrl_c, "hydra.sweep.dir=cut", cwd=tmp_path, check=False, env=env)
    assert cut.returncode == 1, cut.stderr[-2000:]
    last = cut.stderr.strip().splitlines()[-1]
    assert last == (
        "error: interrupted with 1 of 3 epochs done; "
        "to continue, rerun the sweep with resume=true hydra.sweep.dir=cut"
    )
    assert "Traceback" not in cut.stderr
    jobs = job_dirs(tmp_path / "cut")
    assert len(jobs) == 4
    for job in jobs:
        assert json.loads((job / "failure.json").read_text())["status"] == "interrupted"
        saved = torch.load(job / "checkpoints/last.ckpt", weights_only=True)
        assert saved["epoch"] == 0 and saved["hyper_parameters"]["replicas"] == 1
    run_cli(*args, by_num, "resume=true", "hydra.sweep.dir=cut", cwd=tmp_path)
    # Never interrupted: the fit of the same four jobs that the sweep's task trains.
    settings = ("trainer.max_epochs=3", *QUICK[1:])
    full = [tmp_path / "full" / str(i) for i in range(4)]
    heads_seeds = [(h, s) for h in ("head=none", "head=tanh") for s in ("seed=0", "seed=5")]
    cfgs = [
        compose_cfg(h, s, *settings, output_dir=f)
        for (h, s), f in zip(heads_seeds, full, strict=True)
    ]
    assert all(isinstance(m, dict) for m in train_jobs(cfgs))
    for a, b in zip(jobs, full, strict=True):
        for name in SAME:
            assert (a / name).read_text() == (b / name).read_text(), (a.name, name)
        assert read_metrics(a)["history"] == read_metrics(b)["history"]
        assert not (a / "failure.json").exists()


@pytest.mark.cli
def test_optunas_batches_of_trials_fuse(tmp_path: Path):
    """hparams_search=optuna with 4 trials per batch, searching only the head: the batch
    trains as one fit, and every trial's numbers and Optuna's best value are the unfused ones."""
    need("optuna", "tune")
    fixed = "optim.lr:'choice(0.001)',data.batch_size:'choice(32)',model.width:'choice(64)'"
    heads = "trainer.max_epochs:'choice(2)',head:'choice(none,relu,sigmoid,tanh)'"
    params = f"hydra.sweeper.params={{{fixed},{heads}}}"
    args = ("-m", "hparams_search=optuna", params, "hydra.sweeper.n_trials=4")
    args = (*args, "hydra.sweeper.n_jobs=4", *FAST[1:])
    fused = run_cli(*args, "hydra.sweep.dir=f", cwd=tmp_path)
    run_cli(*args, "fuse.enabled=false", "hydra.sweep.dir=p", cwd=tmp_path)
    assert "group 0: 4 jobs, 4 models, one task" in fused.stdout
    a, b = job_dirs(tmp_path / "f"), job_dirs(tmp_path / "p")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert (x / ".hydra/overrides.yaml").read_text() == (
            (y / ".hydra/overrides.yaml").read_text().replace("- fuse.enabled=False\n", "")
        )
        assert read_metrics(x)["val/mae"] == read_metrics(y)["val/mae"]
    best = [(tmp_path / d / "optimization_results.yaml").read_text() for d in ("f", "p")]
    assert best[0] == best[1]


@pytest.mark.unit
def test_jobs_sharing_a_head_keep_their_own_head_call(make_cfg, tmp_path: Path, caplog):
    """Two jobs of 10 replicas with the same sigmoid (or softplus) head: one call over all 20
    would round some replicas differently (vectorized body vs scalar tail), so each job's
    head is called on its own replicas, and every number equals the lone run's."""
    caplog.set_level(logging.INFO, logger="housing_reg.train")
    args = ("model.replicas=10", "data.target_scaling=minmax", "trainer.max_epochs=1", *QUICK[1:])
    jobs = [(h, s) for h in ("head=sigmoid", "head=softplus") for s in ("seed=0", "seed=10")]
    cfgs = [make_cfg(h, s, *args, output_dir=tmp_path / "f" / f"{h},{s}") for h, s in jobs]
    assert all(isinstance(m, dict) for m in train_jobs(cfgs))
    assert any(m.startswith("fit 1 of 1: 4 jobs, 40 models") for m in caplog.messages)
    for h, s in jobs:
        x, y = tmp_path / "f" / f"{h},{s}", tmp_path / "p" / f"{h},{s}"
        train(make_cfg(h, s, *args, output_dir=y))
        for name in SAME:
            assert (x / name).read_text() == (y / name).read_text(), (x.name, name)


@pytest.mark.unit
def test_a_fit_of_several_jobs_pools_their_threads_where_each_keeps_its_bits(make_cfg, tmp_path):
    """A fit of several jobs trains on their threads together, within the process's own; a
    lone job on its own; so does a fit where a job's head would take more than GRAIN elements
    in one call (torch would split it among threads, and a split sigmoid rounds otherwise)."""

    def jobs(*overrides: str, n: int = 3) -> list:
        return [
            prepare(i, make_cfg(f"seed={i}", *overrides, output_dir=tmp_path / str(i)))
            for i in range(n)
        ]

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the threads this process has
    try:
        assert fit_threads(jobs()) == 2
        assert fit_threads(jobs(n=1)) == 1
        assert fit_threads(jobs("threads=2")) == 2
        big = jobs("model.replicas=330", n=2)  # 330 replicas x 102 test rows in one call
        assert head_elements(big[0]) > GRAIN and fit_threads(big) == 1
    finally:
        torch.set_num_threads(before)
