"""Searches as tests run them: the space files, the command and its environment, and the one
end-to-end search that test_search and test_analysis both read (the ``e2e_search`` fixture in
conftest, run once per session: a real search costs more than most test modules).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# digits, a resnet8 teacher trained for 2 epochs, 4-epoch trials: seconds per trial on 2 cores
FIXED = {"dataset": "digits", "teacher": "resnet8", "teacher_epochs": 2, "student": "resnet8",
         "method": "kd", "epochs": 4, "batch_size": 128, "schedule": "cosine", "seed": 0}
SPACE = {
    "name": "e2e",
    "fixed": FIXED,
    "space": {"lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
    "search": {"algorithm": "tpe", "num_samples": 6, "metric": "val/acc1", "mode": "max", "seed": 0,
               "max_concurrent": 2},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpus_per_trial": 1},
}
# The end-to-end search: the method searched with a conditional sub-space (temperature exists
# only in kd trials, and the student-alone baseline, method none, comes from the search itself),
# 6 TPE trials one at a time, ASHA over 4 epochs (rungs at 1 and 2).
E2E_SPACE = {**SPACE,
             "fixed": {k: v for k, v in FIXED.items() if k != "method"},
             # one trial at a time: one trial process (a second costs seconds of imports on 2 cores)
             "search": {**SPACE["search"], "max_concurrent": 1},
             "space": {"method": {"type": "categorical",
                                  "choices": {"none": {},
                                              "kd": {"temperature": {"type": "float", "low": 1, "high": 8,
                                                                     "log": True}}}},
                       **SPACE["space"]}}


def write_space(folder: Path, base: dict = SPACE, cache_dir: Path | None = None, **changes) -> Path:
    """``folder/space.yaml``: ``base`` with ``changes`` (``section=value`` replaces a section,
    ``section__key=value`` one key of it). The teacher cache defaults to a folder in the
    session's cache folder (conftest's KDTUNE_CACHE_DIR, shared by xdist's workers), so the
    session's searches train a teacher once per recipe, as the cache is meant to work."""
    space = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            space[section][leaf] = value
        else:
            space[section] = value
    space["fixed"]["cache_dir"] = str(cache_dir or Path(os.environ["KDTUNE_CACHE_DIR"]) / "teacher-cache")
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of a search or a CLI run: this checkout first on PYTHONPATH (for the
    subprocesses, Ray's workers and notebook kernels, installed or not), no RAY_ADDRESS."""
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    e.update(extra)
    return e


def search_args(folder: Path, space: Path, *extra: str) -> list[str]:
    """The arguments of ``kdtune search`` for ``space``, its results and store in ``folder``."""
    return [str(space), "--storage-path", str(folder / "ray"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
            *extra]


def search_cmd(folder: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdtune.search", *search_args(folder, space, *extra)]


def seed_store(folder: Path) -> None:
    """``folder/mlflow.db``, unless it exists: a copy of an empty MLflow store made once per test
    session (in the session's cache folder, conftest's KDTUNE_CACHE_DIR, which xdist's workers
    share). A new store costs about 3 s of CPU in MLflow's schema migrations, in every search that
    makes one; a search then finds a real, current store, as a user's second search does. The
    searches that make their store themselves (tests/test_faults.py, the plugin search,
    ``seed=False`` here) keep that path tested."""
    db = folder / "mlflow.db"
    if db.exists():
        return
    template = Path(os.environ["KDTUNE_CACHE_DIR"]) / "mlflow-template.db"
    if not template.exists():
        from mlflow import MlflowClient

        made = template.with_suffix(f".making-{os.getpid()}.db")  # xdist's workers share the folder
        MlflowClient(f"sqlite:///{made}").search_experiments()  # creates and migrates the store
        made.replace(template)
    shutil.copyfile(template, db)


def start_search(folder: Path, space: Path, *extra: str, ray=None,
                 env_extra: dict[str, str] | None = None, seed: bool = True) -> subprocess.Popen:
    """The search as a user runs it, started: on the session's shared Ray instance when ``ray``
    is given (the ``shared_ray`` fixture), else on a private local one that the search starts (in
    the session's own RAY_TMPDIR, set by conftest). Its output goes to files in ``folder``, so
    that searches run at once never block on a full pipe. ``seed``: its MLflow store is made from
    a template (:func:`seed_store`)."""
    if seed:
        seed_store(folder)
    e = {**(ray.env if ray else env()), **(env_extra or {})}
    if ray is not None:
        extra = (*extra, "--address", ray.address)
    with open(folder / "search.out", "w") as out, open(folder / "search.err", "w") as err:
        return subprocess.Popen(search_cmd(folder, space, *extra), cwd=folder, env=e, stdout=out, stderr=err,
                                text=True)


API_NOTEBOOK = ROOT / "analysis" / "python_api.ipynb"
# Executes a notebook (argv 1) in the folder of its copy with outputs (argv 2), where it saves it,
# and prints its streams, so that a search run from the notebook reads like one run by the command.
# The kernel works in that folder, not in analysis/: MLflow puts a new experiment's artifacts in
# ./mlruns of the working directory.
NOTEBOOK_RUNNER = """
import sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
try:
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": sys.argv[2].rsplit("/", 1)[0]}}).execute()
finally:
    nbformat.write(nb, sys.argv[2])
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                print(o["text"], end="", file=sys.stdout if o["name"] == "stdout" else sys.stderr)
"""


def start_notebook_search(folder: Path, space: Path, ray) -> subprocess.Popen:
    """The search ``space`` describes, run by analysis/python_api.ipynb through kdtune.search.run
    (the library under the command), on the shared instance ``ray``: the same folder, store and
    output files as :func:`start_search`, and the executed notebook in ``folder/python_api.ipynb``."""
    seed_store(folder)
    e = {**ray.env, "RAY_ADDRESS": ray.address, "KDTUNE_SPACE": str(space), "KDTUNE_STORAGE": str(folder / "ray"),
         "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    with open(folder / "search.out", "w") as out, open(folder / "search.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", NOTEBOOK_RUNNER, str(API_NOTEBOOK), str(folder / API_NOTEBOOK.name)],
                                cwd=folder, env=e, stdout=out, stderr=err, text=True)


def wait_or_kill(proc: subprocess.Popen, timeout: int) -> None:
    """``proc`` waited for; killed (and the timeout raised) after ``timeout`` seconds."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def finish_search(folder: Path, proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """A search :func:`start_search` started in ``folder``, waited for (killed after ``timeout``)."""
    wait_or_kill(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, (folder / "search.out").read_text(),
                                       (folder / "search.err").read_text())


def run_search(folder: Path, space: Path, *extra: str, ray=None, timeout: int = 600,
               env_extra: dict[str, str] | None = None, seed: bool = True) -> subprocess.CompletedProcess:
    """:func:`start_search`, waited for."""
    return finish_search(folder, start_search(folder, space, *extra, ray=ray, env_extra=env_extra, seed=seed),
                         timeout)


def search_here(folder: Path, space: Path, *extra: str, ray=None, monkeypatch, capsys,
                env_extra: dict[str, str] | None = None, seed: bool = True) -> subprocess.CompletedProcess:
    """The search of :func:`run_search` on the instance ``ray`` (None: a private one), run by
    ``kdtune search``'s main in this process (tests/commands.py): the same search and output,
    without a new interpreter's 7 s of CPU in imports. ``env_extra`` holds for the search; a
    plugin it names (``KDTUNE_PLUGINS``), a module of ``folder`` (where Ray's workers find it
    too) or of a package, is forgotten after the search with what it registered. ``seed``: as
    :func:`start_search`. The command keeps tests in real processes: the killed and interrupted
    searches, and test_faults' refusals that need one (two at once, a read-only store)."""
    from commands import run_here

    from kdtune import plugins
    from kdtune.data import DATASETS
    from kdtune.distillers import METHODS
    from kdtune.distillers.feature import FEATURE_LOSSES
    from kdtune.models import MODELS
    from kdtune.sampling import SAMPLERS

    if seed:
        seed_store(folder)
    for key, value in {**(ray.env if ray else env()), **(env_extra or {})}.items():
        if key != "PYTHONPATH":
            monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(folder))
    for registry in (METHODS, MODELS, DATASETS, SAMPLERS, FEATURE_LOSSES):
        monkeypatch.setattr(registry, "_builders", dict(registry._builders))
    monkeypatch.setattr(plugins, "_loaded", set(plugins._loaded))
    modules = set(sys.modules)
    try:
        return run_here("search", *search_args(folder, space, *extra, *(("--address", ray.address) if ray else ())),
                        cwd=folder, monkeypatch=monkeypatch, capsys=capsys)
    finally:
        named = set(os.environ.get("KDTUNE_PLUGINS", "").split(","))
        for name in set(sys.modules) - modules:  # the plugin's module: imported afresh by the next test
            if name in named or Path(getattr(sys.modules[name], "__file__", None) or "/").parent == folder:
                del sys.modules[name]


def mlflow_run_count(folder: Path, kind: str | None = None) -> int:
    """Runs in ``folder/mlflow.db`` (only those tagged ``kdtune.kind=<kind>``: "search" counts
    searches), read with sqlite: no MLflow import, no database created."""
    db = folder / "mlflow.db"
    if not db.exists():
        return 0
    con = sqlite3.connect(db)
    try:
        if kind is not None:
            return con.execute("select count(*) from tags where key = 'kdtune.kind' and value = ?",
                               (kind,)).fetchone()[0]
        return con.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.OperationalError:  # no runs table: nothing was ever recorded
        return 0
    finally:
        con.close()


@dataclass(frozen=True)
class SearchRun:
    """A finished search: its folder of files, its search folder, its MLflow store, its output."""
    dir: Path
    folder: Path
    uri: str
    result: subprocess.CompletedProcess

    @classmethod
    def of(cls, folder: Path, result: subprocess.CompletedProcess) -> "SearchRun":
        """The search named as the spaces here name it, run in ``folder``."""
        return cls(folder, folder / "ray" / SPACE["name"], f"sqlite:///{folder / 'mlflow.db'}", result)

    def check(self) -> None:
        """The search ended 0, and its folder holds its own trials only (searches of one name run
        at once on the shared instance: see kdtune/search/staging.py)."""
        r = self.result
        assert r.returncode == 0, f"{self.dir.name}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        folders = sorted(d.name for d in self.folder.glob("KDTrainable_*"))  # KDTrainable_<trial id>_<n>_...
        with open(self.folder / "results.csv") as f:
            ids = [row["trial_id"] for row in csv.DictReader(f)]
        assert len(folders) == len(ids) and all(any(d.startswith(f"KDTrainable_{t}_") for d in folders)
                                                for t in ids), (self.dir.name, folders, ids)


def run_at_once(started: dict[str, tuple[Path, subprocess.Popen]]) -> dict[str, SearchRun]:
    """Searches started with :func:`start_search` (name -> folder, process), each waited for."""
    return {name: SearchRun.of(folder, finish_search(folder, proc)) for name, (folder, proc) in started.items()}


def e2e_search(folder: Path, ray) -> SearchRun:
    """The end-to-end search, on the session's shared Ray instance ``ray`` (the searches that
    start a private local instance, the default a user gets, are in test_search and test_faults),
    run by the command's main in this process, its output in the folder's files as a batch
    writes them (tests/search_batch.py)."""
    from search_batch import run

    from kdtune.logs import configure

    seed_store(folder)
    args = search_args(folder, write_space(folder, E2E_SPACE), "--status-every", "2", "--address", ray.address)
    try:
        run({"folder": str(folder), "env": ray.env, "argv": args})
    finally:
        configure()  # as the tests' conftest left it
    return SearchRun.of(folder, batch_result(folder))


FLAKY_PLUGIN = '''
"""A KD variant that crashes in epoch 2: once (like a lost worker), or every time."""
from pathlib import Path

from kdtune.distillers import METHODS
from kdtune.distillers.kd import KD


@METHODS.register("flaky_kd")
class FlakyKD(KD):
    def __init__(self, student, teacher, *, crash_always: bool = False, temperature: float = 4.0) -> None:
        super().__init__(student, teacher, temperature=temperature)
        self.crash_always = crash_always

    def on_epoch_start(self, epoch, num_epochs):
        super().on_epoch_start(epoch, num_epochs)
        print(f"flaky_kd epoch {epoch}")
        marker = Path(__file__).parent / f"crashed-{self.crash_always}"
        if epoch == 2 and (self.crash_always or not marker.exists()):
            marker.touch()
            raise RuntimeError("simulated crash")
'''


LOST_WORKER_PLUGIN = '''
"""In the search's driver only: Ray raises ActorUnavailableError out of Tuner.fit once, after a
trial reported its first epoch, as it did once under load (issue 14)."""
import os
from pathlib import Path

from ray.exceptions import ActorUnavailableError

from kdtune.search.progress import Progress

_on_step_end = Progress.on_step_end


def on_step_end(self, iteration, trials, **info):
    marker = Path(os.environ["LOST_MARKER"])
    if not marker.exists() and any(t.last_result.get("training_iteration", 0) >= 1 for t in trials):
        marker.touch()
        raise ActorUnavailableError("RpcError: Socket closed (simulated)", None)
    return _on_step_end(self, iteration, trials, **info)


Progress.on_step_end = on_step_end
'''


# The short searches run at once on the shared instance (the ``short_searches`` fixture): each
# one's start-up (imports, teacher, MLflow) and its waits overlap the others' trials. They carry the
# methods (KDAS, CTKD, SAKD), the algorithms and schedulers that need no search of their own
# (Optuna's GP sampler, the median-stopping rule, Hyperband with a diverging trial, PBT, PB2),
# several objectives, and the faults (a crashing trial, a worker lost in the driver). On the
# instance's 2 CPUs, one trial at a time each where a search allows it (a second slot would only
# start a second trial process, seconds of imports, to wait for a CPU).
#
# Several objectives, and KDAS in a real search: 4 trials of KD + KDAS on digits, 4 epochs each
# (the ratio goes from start_rate to end_rate; scoring epochs 1 and 3), one at a time, proposed by
# Optuna's GP sampler: trials that train on fewer samples for a little accuracy, or not
# (tests/test_multiobjective.py and test_search.py's KDAS test read it).
MO_SPACE = {**SPACE,
            "fixed": {**FIXED, "sampler": "kdas", "sampling_period": 2},
            "space": {"start_rate": {"type": "float", "low": 0.4, "high": 1.0},
                      "end_rate": {"type": "float", "low": 0.1, "high": 0.4}},
            "search": {"algorithm": "gp", "num_samples": 4, "seed": 0, "max_concurrent": 1,
                       "objectives": {"val/acc1": "max", "samples/backprop": "min"}},
            "scheduler": {"type": "none"}}
SHORT_SEARCHES = {
    "sakd": dict(fixed={**SPACE["fixed"], "method": "sakd", "epochs": 3},
                 space={"gate_bias": {"type": "categorical", "choices": [-10.0, 10.0]}},
                 search={"algorithm": "grid", "metric": "val/acc1", "mode": "max", "max_concurrent": 1},
                 scheduler={"type": "none"}),
    # a population of 2, the bottom half copying the top half at epoch 2. Ray Tune keeps a paused
    # trial's process only when another trial waits to start, so with the whole population
    # running every pause starts a new trial process, seconds of imports: a population of 4
    # perturbed every epoch started 5 processes for 4 trials and cost 38-49 s of CPU, this one 24 s.
    "pbt": dict(space={**SPACE["space"], "temperature": {"type": "float", "low": 1.0, "high": 8.0}},
                search={**SPACE["search"], "algorithm": "random", "num_samples": 2, "max_concurrent": None},
                scheduler={"type": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5}),
    "pb2": dict(search={**SPACE["search"], "algorithm": "random", "num_samples": 2, "max_concurrent": None},
                fixed={**SPACE["fixed"], "epochs": 3},
                scheduler={"type": "pb2", "perturbation_interval": 2, "quantile_fraction": 0.5}),
    "diverging": dict(space={"lr": {"type": "categorical", "choices": [0.05, 1.0e12]}},
                      search={"algorithm": "grid", "metric": "val/acc1", "mode": "max"},
                      scheduler={"type": "hyperband", "reduction_factor": 2}),
}
# run from analysis/python_api.ipynb (kdtune.search.run in a notebook kernel), not by the command
NOTEBOOK_SEARCHES = {"sakd"}
# searches with a fault: their plugin, written into their folder (the search forwards KDTUNE_PLUGINS
# to the cluster's workers, and Ray puts the search's folder on their path), and its environment
FAULTS = {
    # one trial crashes once, one always (a plugin method)
    "crashed": (dict(fixed={**SPACE["fixed"], "method": "flaky_kd", "epochs": 3},
                     space={"crash_always": {"type": "categorical", "choices": [False, True]}},
                     search={"algorithm": "grid", "metric": "val/acc1", "mode": "max", "max_concurrent": 1},
                     scheduler={"type": "none"}, max_failures=1, checkpoint_every_s=0),
                ("flaky_plugin", FLAKY_PLUGIN), {}),
    # CTKD under the median-stopping rule, whose driver has a RayActorError escape Tune once
    # (test_search reads it for both: a search of its own costs about 20 s of CPU)
    "lost": (dict(fixed={**SPACE["fixed"], "method": "ctkd", "curriculum_epochs": 2},
                  space={"temperature_mode": {"type": "categorical", "choices": ["global", "instance"]},
                         "lambda_max": {"type": "float", "low": 0.5, "high": 2.0}},
                  search={**SPACE["search"], "num_samples": 3, "max_concurrent": 1},
                  scheduler={"type": "median", "grace_period": 1}),
             ("lost_worker", LOST_WORKER_PLUGIN), {"LOST_MARKER": "{folder}/lost"}),
}


def imagenet_space(folder: Path) -> dict:
    """The streaming ``imagenet`` search (tests/test_imagenet.py reads it): a fabricated ImageFolder at
    16 x 16, torchvision's ResNet-34 from a weights file distilled into ResNet-18 from the crop cache
    (built by the driver), one trial of one epoch."""
    import torch
    import torchvision

    from imagefolder import CLASSES, write_imagefolder

    torch.manual_seed(0)
    weights = folder / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=len(CLASSES)).state_dict(), weights)
    fixed = {"dataset": "imagenet", "data_root": str(write_imagefolder(folder / "data")), "val_size": 16,
             "dataset_options": {"resolution": 16, "workers": 0}, "teacher": "tv_resnet34",
             "teacher_checkpoint": str(weights), "student": "tv_resnet18", "method": "kd", "teacher_cache": "crops",
             "teacher_cache_crops": 2, "teacher_cache_topk": 3, "epochs": 1, "batch_size": 32, "seed": 0}
    return dict(fixed=fixed, search={**SPACE["search"], "algorithm": "random", "num_samples": 1},
                scheduler={"type": "none"})


# The short searches in two processes that run theirs one after another (tests/search_batch.py):
# about 7 s of CPU in imports saved per search, and at most three searches at once (with the
# notebook's) on the instance's two CPUs. A search whose plugin patches kdtune in its process
# ("lost") goes last.
BATCHES = (("imagenet", "pbt", "diverging", "crashed"), ("objectives", "pb2", "lost"))


def start_batch(folder: Path, jobs: list[dict], ray) -> subprocess.Popen:
    """``jobs`` (see tests/search_batch.py) run in turn by one process, on ``ray``."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    with open(folder / "batch.out", "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "search_batch.py"), str(folder / "jobs.json")],
                                cwd=folder, env=ray.env, stdout=out, stderr=subprocess.STDOUT, text=True)


def batch_result(folder: Path, batch: subprocess.Popen | None = None) -> subprocess.CompletedProcess:
    """The search a batch ran in ``folder``: its exit status (the batch's, or -1, if the batch ended
    before it) and its output."""
    rc = folder / "search.rc"
    code = int(rc.read_text()) if rc.is_file() else ((batch and batch.returncode) or -1)
    read = lambda name: (folder / name).read_text() if (folder / name).is_file() else ""  # noqa: E731
    return subprocess.CompletedProcess(["kdtune", "search"], code, read("search.out"), read("search.err"))


def short_searches(tmp_path_factory, ray) -> dict[str, SearchRun]:
    """Every search of SHORT_SEARCHES, MO_SPACE ("objectives"), the imagenet one and FAULTS, on
    ``ray``: those of NOTEBOOK_SEARCHES from the Python API's notebook, the others in the two
    batches of BATCHES, all three at once; each finished one's exit status checked, except the
    faults' (their tests check them)."""
    jobs, notebooks = {}, {}
    folder = tmp_path_factory.mktemp("imagenet")
    jobs["imagenet"] = (folder, write_space(folder, **imagenet_space(folder)), {})
    for name, changes in {**SHORT_SEARCHES, "objectives": dict(base=MO_SPACE)}.items():
        folder = tmp_path_factory.mktemp(name)
        space = write_space(folder, **changes)
        if name in NOTEBOOK_SEARCHES:
            notebooks[name] = (folder, start_notebook_search(folder, space, ray))
        else:
            jobs[name] = (folder, space, {})
    for name, (changes, (module, code), extra) in FAULTS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / f"{module}.py").write_text(code)
        env_extra = {"KDTUNE_PLUGINS": module, "PYTHONPATH": os.pathsep.join([str(folder), ray.env["PYTHONPATH"]]),
                     **{k: v.format(folder=folder) for k, v in extra.items()}}
        jobs[name] = (folder, write_space(folder, **changes), env_extra)
    assert sorted(n for batch in BATCHES for n in batch) == sorted(jobs)
    batches = []
    for i, names in enumerate(BATCHES):
        for name in names:
            seed_store(jobs[name][0])
        batch = [{"folder": str(folder), "env": env_extra,
                  "argv": search_args(folder, space, "--status-every", "60", "--address", ray.address)}
                 for folder, space, env_extra in (jobs[n] for n in names)]
        batches.append((names, start_batch(tmp_path_factory.mktemp(f"batch{i}"), batch, ray)))
    runs = run_at_once(notebooks)
    for names, proc in batches:
        wait_or_kill(proc, 900)
        runs.update({n: SearchRun.of(jobs[n][0], batch_result(jobs[n][0], proc)) for n in names})
    for name, run in runs.items():
        if name not in FAULTS:
            run.check()
    return runs
