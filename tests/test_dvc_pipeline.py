"""dvc.yaml against the CLI and the code: commands parse, dependencies cover the code, params are per stage.

The last test runs DVC for real on a tiny phantom in a scratch git repository: ``dvc repro`` of the
first two stages, a no-op second ``repro``, ``dvc exp run -S`` rerunning only the stage whose
parameter changed, ``dvc metrics show``, and one MLflow parent run grouping the stage runs.
"""

import ast
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from healthivert.cli import COMMANDS, build_parser
from healthivert.config import Params

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
#: the phantom stage, apart so that it runs only when the phantom is the dataset.
PHANTOM_DVC_YAML = Path("datasets") / "phantom" / "dvc.yaml"
PHANTOM_STAGE = yaml.safe_load((REPO / PHANTOM_DVC_YAML).read_text())["stages"]["phantom"]
#: every stage: the phantom first, then the main DAG.
STAGES = {"phantom": PHANTOM_STAGE, **DVC_YAML["stages"]}
#: ``${...}`` in dvc.yaml, as DVC resolves it from params.yaml's defaults.
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def _resolved(text: str) -> str:
    """``text`` with every ``${section.key}`` replaced by its value in params.yaml."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(functools.reduce(dict.get, m[1].split("."), DEFAULTS)), text)
#: modules a stage imports that are not code dependencies: parameters are tracked as params,
#: tracking and error reporting do not change outputs.
NOT_CODE_DEPS = ("healthivert", "healthivert.config", "healthivert.errors", "healthivert.cli",
                 "healthivert.stages", "healthivert.stages.common", "healthivert.tracking")


def _argv(stage: dict) -> list[str]:
    argv = shlex.split(_resolved(stage["cmd"]))
    assert argv[0] == "healthivert"
    return argv[1:]


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "healthivert" and _module_file(name)}


def _code_closure(module: str) -> set[Path]:
    """Files of every healthivert module ``module`` imports, transitively, except the non-code ones."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if not name or name in seen or name in NOT_CODE_DEPS or name.startswith("healthivert.tracking."):
            continue
        seen.add(name)
        todo.extend(_imported_modules(_module_file(name)))
        todo.append(name.rpartition(".")[0])  # importing a module runs its package's __init__
    return {_module_file(name).relative_to(REPO) for name in seen}


def test_every_stage_command_parses_with_the_cli() -> None:
    parser = build_parser()
    for name, stage in STAGES.items():
        argv = _argv(stage)
        assert argv[0].replace("-", "_") == name, f"stage {name} runs {argv[0]}"
        assert argv[0] in COMMANDS
        args = parser.parse_args(argv)  # exits on an unknown or missing flag
        assert args.metrics == Path(f"metrics/{name}.json")


def test_stage_order_matches_the_cli() -> None:
    stage_commands = [name for name in COMMANDS if name.replace("-", "_") in STAGES]
    assert [c.replace("-", "_") for c in stage_commands] == list(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_code_dependencies_cover_what_the_stage_imports(name: str) -> None:
    deps = [REPO / dep for dep in STAGES[name]["deps"] if dep.startswith("src/")]
    for dep in deps:
        assert dep.exists(), f"{name}: dependency {dep} does not exist"
    module = COMMANDS[_argv(STAGES[name])[0]][0]
    for path in _code_closure(module):
        assert any((REPO / path).is_relative_to(dep) for dep in deps), f"{name} imports {path} but does not depend on it"


def test_params_are_per_stage_sections() -> None:
    sections = set(Params.model_fields)
    for name, stage in STAGES.items():
        assert set(stage["params"]) <= sections
        assert "tracking" not in stage["params"]
        if name in sections:
            assert name in stage["params"]
    assert STAGES["rhlv"]["params"] == ["rhlv"]


def test_outputs_metrics_and_checkpoints() -> None:
    produced: dict[str, str] = {}
    for name, stage in STAGES.items():
        for dep in map(_resolved, stage["deps"]):
            if not dep.startswith("src/"):
                assert any(dep == out or dep.startswith(out + "/") for out in produced), f"{name}: {dep} has no producer"
        metrics = stage["metrics"]
        assert metrics == [{f"metrics/{name}.json": {"cache": False}}]
        argv = _argv(stage)
        for out in stage["outs"]:
            path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if path.startswith("checkpoints/"):
                assert options == {"persist": True, "cache": False}
                assert argv[argv.index("--checkpoint-dir") + 1] == path
            produced[path] = name
    assert produced["checkpoints/train_coarse"] == "train_coarse"
    assert produced["checkpoints/train_fine"] == "train_fine"


def test_plots_read_what_evaluate_writes() -> None:
    files = []
    for plot in DVC_YAML["plots"]:
        target, options = (plot, {}) if isinstance(plot, str) else next(iter(plot.items()))
        axes = [axis for axis in (options.get("x"), options.get("y")) if isinstance(axis, dict)]
        files += [path for axis in axes for path in axis] or [target]
    evaluate_out = [out for out in STAGES["evaluate"]["outs"] if isinstance(out, str)]
    assert files and all(any(f.startswith(out + "/") for out in evaluate_out) for f in files)


def test_dvc_accepts_the_pipeline() -> None:
    listed = subprocess.run(["dvc", "stage", "list", "--all"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == [*DVC_YAML["stages"], f"{PHANTOM_DVC_YAML}:phantom"]


def test_the_dataset_is_a_setting() -> None:
    """preprocess reads and depends on ``data.source`` / ``data.grades``; only the phantom default needs the phantom."""
    preprocess = DVC_YAML["stages"]["preprocess"]
    assert {"${data.source}", "${data.grades}"} <= set(preprocess["deps"]) and "data" in preprocess["params"]
    argv = _argv(preprocess)
    assert argv[argv.index("--input") + 1] == DEFAULTS["data"]["source"] == PHANTOM_STAGE["outs"][0]
    assert argv[argv.index("--grades") + 1] == DEFAULTS["data"]["grades"] == f"{PHANTOM_STAGE['outs'][0]}/grades.csv"
    assert "phantom" not in DVC_YAML["stages"] and PHANTOM_STAGE["wdir"] == "../.."


# ------------------------------------------------------------------------------- a real DVC project
TINY = {
    "phantom": {"cases": 2, "vertebrae_per_case": [3, 3], "seed": 3, "real_shapes": []},
    "preprocess": {"crop_shape": [64, 64, 16]},
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def make_project(tmp_path: Path, tiny: dict[str, dict]) -> tuple[Path, dict[str, str]]:
    """A scratch git + DVC project with this project's dvc.yaml files, ``tiny`` params and the code they hash."""
    root = tmp_path / "project"
    shutil.copytree(SRC, root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / PHANTOM_DVC_YAML).parent.mkdir(parents=True)
    shutil.copy(REPO / PHANTOM_DVC_YAML, root / PHANTOM_DVC_YAML)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/mlflow.db\n/mlartifacts/\n/.healthivert/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    env.pop("HEALTHIVERT_PIPELINE_RUN", None)
    env.pop("HEALTHIVERT_PIPELINE_GROUP", None)
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's DVC settings (cache links)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A scratch project with the tiny phantom settings."""
    return make_project(tmp_path, TINY)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_repro_is_incremental_and_tracked(project: tuple[Path, dict[str, str]]) -> None:
    from mlflow.tracking import MlflowClient

    root, env = project
    first = _run(["dvc", "repro", "preprocess"], root, env)
    assert f"Running stage '{PHANTOM_DVC_YAML}:phantom'" in first and "Running stage 'preprocess'" in first
    assert (root / "data/preprocessed/manifest.parquet").is_file()
    lock = yaml.safe_load((root / PHANTOM_DVC_YAML).with_name("dvc.lock").read_text())
    raw_md5 = next(o["md5"] for o in lock["stages"]["phantom"]["outs"] if o["path"] == "data/phantom")

    second = _run(["dvc", "repro", "preprocess"], root, env)
    assert "Running stage" not in second

    metrics = _run(["dvc", "metrics", "show", "--json"], root, env)
    assert "metrics/preprocess.json" in metrics

    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "tiny run"], root, env)
    exp = _run(["dvc", "exp", "run", "preprocess", "-S", "preprocess.hu_window=[-400.0,1000.0]"], root, env)
    assert "Running stage 'preprocess'" in exp and f"Running stage '{PHANTOM_DVC_YAML}:phantom'" not in exp

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("healthivert")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("healthivert.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("healthivert.stage") == "preprocess"]
    assert len(parents) == 2  # the repro, then the experiment (new params digest)
    assert [r.data.tags["mlflow.parentRunId"] for r in stages] == [p.info.run_id for p in parents]
    assert all(r.info.status == "FINISHED" for r in stages)
    assert stages[0].data.tags["dvc.dep.data/phantom"] == raw_md5
    assert stages[0].data.tags["git.commit"] != stages[1].data.tags["git.commit"]
    assert stages[0].data.params["preprocess.crop_shape"] == "[64, 64, 16]"
    assert json.loads(stages[1].data.params["preprocess.hu_window"]) == [-400.0, 1000.0]
    # what the MLflow UI's runs table shows: the dataset, the git source and the stage times, on the pipeline run too
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for parent, stage in zip(parents, stages):
        for run in (parent, stage):
            (dataset,) = run.inputs.dataset_inputs
            assert (dataset.dataset.name, dataset.dataset.source_type) == ("phantom", "local")
            assert run.data.tags["mlflow.source.git.commit"] == stage.data.tags["git.commit"].removesuffix("+dirty")
        times = {k: v for k, v in parent.data.metrics.items() if k.startswith("time.") and k != "time.total_s"}
        assert "time.preprocess_s" in times and parent.data.metrics["time.total_s"] == pytest.approx(sum(times.values()))
    assert {k for k in parents[0].data.metrics if k.startswith("time.")} == {"time.phantom_s", "time.preprocess_s",
                                                                               "time.total_s"}
