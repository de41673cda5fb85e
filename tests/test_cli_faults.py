"""Faults a user can cause from the command line, through ``main(argv)`` for every command.

Each fault must end in one line on stderr naming the file, flag or parameter, exit code 2, and
leave the working folder exactly as it was. The table has one row per command (:data:`COMMANDS`):
the generic faults (output paths, parameter files, ``--set``) are crossed with every row, the
command-specific faults are listed in :data:`SPECIFIC`. A new command needs one :data:`COMMANDS`
row (the coverage test fails until it has one).

Folders a user may not write or read are faults only for a user who is not root: run as root, those
rows call ``main`` in a forked child that has dropped to the ``nobody`` user.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from healthivert import cli
from healthivert.config import Params, PhantomParams, dump_params
from healthivert.phantom.generator import write_dataset

OUT = "{out}"
GRADE_PIPELINE = str(Path(__file__).resolve().parents[1] / "pipelines" / "grade_pipeline.py")
NOBODY = 65534
#: the flags of every parameter-reading command: the workspace's parameters (tracking off).
PARAMS = ("--params", "params.yaml")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of the table: its arguments (paths relative to the workspace) and what it writes.

    Attributes:
        args: the arguments after the command name; ``{out}`` stands for the output path.
        out: the output's default path in the workspace.
        folder: whether the output is a folder (else a file).
        params: whether the command reads ``--params`` and ``--set``.
        metrics: whether it takes ``--metrics FILE``.
    """

    args: tuple[str, ...]
    out: str = "result"
    folder: bool = True
    params: bool = True
    metrics: bool = True

    def argv(self, name: str, out: str | None = None) -> list[str]:
        """The full argument list, with ``out`` (default: :attr:`out`) as the output."""
        argv = [name, *(arg.replace(OUT, out or self.out) for arg in self.args)]
        return argv + list(PARAMS) if self.params else argv


#: every command of ``healthivert``, with valid-looking inputs (the faults are caught before they are read).
COMMANDS: dict[str, Command] = {
    "phantom": Command(("--out", OUT, "--cases", "1")),
    "preprocess": Command(("--input", "raw", "--out", OUT)),
    "train-coarse": Command(("--data", "preprocessed", "--out", OUT, "--attention-out", "attention",
                             "--checkpoint-dir", "checkpoints")),
    "train-fine": Command(("--data", "preprocessed", "--attention", "attention", "--coarse", "coarse",
                           "--out", OUT, "--checkpoint-dir", "checkpoints")),
    "synthesize": Command(("--data", "preprocessed", "--attention", "attention", "--model", "model", "--out", OUT)),
    "rhlv": Command(("--data", "preprocessed", "--synth", "synthesized", "--out", OUT)),
    "svm-fit": Command(("--rhlv", "rhlv.parquet", "--out", OUT)),
    "evaluate": Command(("--data", "preprocessed", "--synth", "synthesized", "--rhlv", "rhlv", "--svm", "svm",
                         "--out", OUT)),
    "heights": Command(("--mask", "raw/derivatives/sub-phantom000/sub-phantom000_seg-vert_msk.nii.gz", "--out", OUT),
                       out="heights.csv", folder=False, params=False, metrics=False),
    "submit": Command(("--compile-only", OUT), out="pipeline.yaml", folder=False, metrics=False),
    "grade-cohort": Command(("--prefix", "raw", "--model", "model", "--out", OUT), params=False, metrics=False),
    "grade": Command(("--ct", "raw/rawdata/sub-phantom000/sub-phantom000_ct.nii.gz", "--labels",
                      "raw/derivatives/sub-phantom000/sub-phantom000_seg-vert_msk.nii.gz", "--model", "model",
                      "--out", OUT), params=False, metrics=False),
}


@dataclasses.dataclass(frozen=True)
class Fault:
    """One bad input: how to set it up in the workspace, the argv it gives, and the message expected.

    Attributes:
        prepare: makes the fault in the workspace; returns the full argv.
        message: a fragment of the one-line error.
        restricted: the fault is a permission the ``nobody`` user lacks (run as that user when root).
    """

    prepare: Callable[[Path, str, Command], list[str]]
    message: str
    restricted: bool = False


def _wrong_kind(ws: Path, name: str, command: Command) -> list[str]:
    (ws / command.out).mkdir() if not command.folder else (ws / command.out).write_text("a file\n")
    return command.argv(name)


def _under_a_file(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "blocker").write_text("a file\n")
    return command.argv(name, f"blocker/{command.out}")


def _not_writable(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "locked").mkdir(mode=0o555)
    (ws / "locked").chmod(0o555)
    return command.argv(name, f"locked/{command.out}")


def _metrics_is_a_folder(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "metrics.json").mkdir()
    return [*command.argv(name), "--metrics", "metrics.json"]


def _params_is_a_folder(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "configs").mkdir()
    return [*command.argv(name), "--params", "configs"]


def _params_is_binary(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "params.bin").write_bytes(bytes(range(256)))
    return [*command.argv(name), "--params", "params.bin"]


def _with_set(assignment: str) -> Callable[[Path, str, Command], list[str]]:
    return lambda ws, name, command: [*command.argv(name), "--set", assignment]


#: faults of every command (those of parameters or metrics only where the command has them).
GENERIC: dict[str, Fault] = {
    "out-wrong-kind": Fault(_wrong_kind, "{out}: is a {kind}"),
    "out-under-a-file": Fault(_under_a_file, "blocker is a file, not a folder"),
    "out-not-writable": Fault(_not_writable, "locked: folder not writable", restricted=True),
    "metrics-is-a-folder": Fault(_metrics_is_a_folder, "metrics.json: is a folder, a file is expected"),
    "params-is-a-folder": Fault(_params_is_a_folder, "configs: is a folder, not a parameter file"),
    "params-is-binary": Fault(_params_is_binary, "params.bin: not a text file"),
    "set-invalid-yaml": Fault(_with_set("preprocess.crop_shape=[128,128"),
                              "--set preprocess.crop_shape=[128,128: value is not valid YAML"),
    "set-unknown-key": Fault(_with_set("preprocess.nosuch=1"),
                             "--set preprocess.nosuch=1: unknown key 'preprocess.nosuch' (valid keys of preprocess:"),
}


def _centroids_of_absent_labels(ctd: Path) -> None:
    """Rewrite a centroid file so that it lists labels C1 and C2 only (the phantom spans T6-L5)."""
    ctd.write_text(json.dumps([{"label": label, "X": 5.0, "Y": 5.0, "Z": 5.0} for label in (1, 2)]))


def _heights_wrong_centroids(ws: Path, name: str, command: Command) -> list[str]:
    _centroids_of_absent_labels(ws / "wrong_ctd.json")
    return [*command.argv(name), "--ctd", "wrong_ctd.json"]


def _preprocess_wrong_centroids(ws: Path, name: str, command: Command) -> list[str]:
    _centroids_of_absent_labels(ws / "raw/derivatives/sub-phantom000/sub-phantom000_seg-subreg_ctd.json")
    return command.argv(name)


def _unreadable_model(ws: Path, name: str, command: Command) -> list[str]:
    (ws / "model").mkdir(mode=0o700)
    (ws / "model" / "generator.pt").write_bytes(b"weights")
    (ws / "model").chmod(0o000)
    (ws / "writable").mkdir()
    (ws / "writable").chmod(0o777)
    return command.argv(name, "writable/synthesized")


#: (command, fault name) -> fault: the faults of one command.
SPECIFIC: dict[tuple[str, str], Fault] = {
    ("svm-fit", "c-grid-empty"): Fault(_with_set("svm_fit.c_grid=[]"), "--set svm_fit.c_grid=[]: invalid value for 'svm_fit.c_grid'"),
    ("svm-fit", "c-grid-negative"): Fault(_with_set("svm_fit.c_grid=[-1]"), "C must be positive"),
    ("svm-fit", "features-empty"): Fault(_with_set("svm_fit.features=[]"), "--set svm_fit.features=[]: invalid value for 'svm_fit.features'"),
    ("svm-fit", "rhlv-table-missing"): Fault(lambda ws, name, command: command.argv(name), "rhlv.parquet"),
    ("heights", "centroids-not-of-this-mask"): Fault(_heights_wrong_centroids, "wrong_ctd.json: centroids of label(s) 1, 2"),
    ("heights", "mask-missing"): Fault(lambda ws, name, command: [name, "--mask", "absent.nii.gz", "--out", command.out],
                                       "absent.nii.gz"),
    ("preprocess", "centroids-not-of-this-mask"): Fault(_preprocess_wrong_centroids, "centroids of label(s) 1, 2"),
    ("preprocess", "input-missing"): Fault(lambda ws, name, command: [*command.argv(name), "--input", "absent"], "absent"),
    ("grade", "model-missing"): Fault(lambda ws, name, command: command.argv(name), "model"),
    ("grade-cohort", "model-missing"): Fault(lambda ws, name, command: command.argv(name),
                                             "model: grader bundle folder not found"),
    ("grade-cohort", "nothing-to-grade"): Fault(lambda ws, name, command: [name, "--model", "model", "--out", "result"],
                                                "--cases: nothing to grade"),
    ("grade-cohort", "case-not-json"): Fault(lambda ws, name, command: [*command.argv(name), "--cases", "{raw"],
                                             "--cases {{raw: not a JSON object"),
    ("submit", "grade-with-training-params"): Fault(lambda ws, name, command: [*command.argv(name), "--pipeline",
                                                                                GRADE_PIPELINE],
                                                    "--params: not a flag of the grade pipeline"),
    ("submit", "grade-parallelism-zero"): Fault(lambda ws, name, command: [name, "--compile-only", command.out,
                                                                            "--pipeline", GRADE_PIPELINE, "--parallelism", "0"],
                                                "--parallelism: must be 1 or more, got 0"),
    ("submit", "grade-without-grader"): Fault(lambda ws, name, command: [name, "--host", "http://127.0.0.1:9", "--pipeline",
                                                                          GRADE_PIPELINE, "--prefix", "s3://cohort/scans"],
                                              "--grader: missing"),
    ("submit", "grader-on-train"): Fault(lambda ws, name, command: [*command.argv(name), "--grader", "model"],
                                         "--grader: not a flag of the train pipeline"),
    ("synthesize", "model-folder-unreadable"): Fault(_unreadable_model, "cannot read the saved generator: Permission denied",
                                                     restricted=True),
}


def _rows() -> list[pytest.param]:
    rows = []
    for name, command in COMMANDS.items():
        for fault_name, fault in GENERIC.items():
            if (fault_name.startswith(("params-", "set-")) and not command.params) or \
                    (fault_name.startswith("metrics-") and not command.metrics):
                continue
            rows.append(pytest.param(name, fault, id=f"{name}-{fault_name}"))
    rows += [pytest.param(name, fault, id=f"{name}-{fault_name}") for (name, fault_name), fault in SPECIFIC.items()]
    return rows


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-case phantom dataset of three vertebrae (the inputs of preprocess and heights)."""
    root = tmp_path_factory.mktemp("tiny") / "raw"
    write_dataset(root, PhantomParams(cases=1, seed=3, vertebrae_per_case=(3, 3), spacing_mm_range=(1.5, 1.5)))
    return root


@pytest.fixture
def workspace(tiny_phantom: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working folder of one row: parameters with tracking off and the tiny phantom, readable by anyone."""
    ws = Path(tempfile.mkdtemp(prefix="healthivert-faults-"))
    ws.chmod(0o755)  # the rows run as nobody must reach it
    shutil.copytree(tiny_phantom, ws / "raw")
    (ws / "params.yaml").write_text(dump_params(Params(tracking={"enabled": False})))
    monkeypatch.chdir(ws)
    yield ws
    for folder, folders, _ in os.walk(ws):  # top-down: each folder is opened before the walk enters it
        for name in folders:
            os.chmod(Path(folder) / name, 0o755)
    shutil.rmtree(ws)


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and modification time (as root sees them)."""
    entries = {}
    for folder, folders, files in os.walk(root):
        for entry in [*folders, *files]:
            path = Path(folder) / entry
            info = path.lstat()
            entries[str(path.relative_to(root))] = (info.st_mode, info.st_size if stat.S_ISREG(info.st_mode) else 0,
                                                   info.st_mtime_ns)
    return entries


def _main_as_nobody(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child running as the ``nobody`` user; its exit code and stderr."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stderr = captured = io.StringIO()
            code = cli.main(argv)
            os.write(write_end, captured.getvalue().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        err = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def _call(argv: list[str], restricted: bool, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if restricted and os.geteuid() == 0:
        return _main_as_nobody(argv)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_table_covers_every_command() -> None:
    assert set(COMMANDS) == set(cli.COMMANDS), "add a row to COMMANDS for each new command"


@pytest.mark.parametrize(("name", "fault"), _rows())
def test_fault_gives_one_line_exit_2_and_changes_nothing(name: str, fault: Fault, workspace: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    command = COMMANDS[name]
    argv = fault.prepare(workspace, name, command)
    before = _snapshot(workspace)
    capsys.readouterr()
    code, err = _call(argv, fault.restricted, capsys)
    expected = fault.message.format(out=command.out, kind="file" if command.folder else "folder")
    assert code == 2, err
    assert err.startswith(f"healthivert {name}: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert _snapshot(workspace) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_stage_removes_its_temporary_output(signum: int, workspace: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM or SIGINT while preprocess writes: one line, 128 + signal, no temporary folder left."""
    before = _snapshot(workspace)

    def interrupt_once_writing() -> None:
        deadline = time.monotonic() + 60
        while not list(workspace.glob(".result.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=interrupt_once_writing)
    sender.start()
    code = cli.main(COMMANDS["preprocess"].argv("preprocess"))
    sender.join()
    err = capsys.readouterr().err
    assert code == 128 + signum
    assert err == f"healthivert preprocess: stopped by {signal.Signals(signum).name}; outputs being written were discarded\n"
    assert _snapshot(workspace) == before


def test_stale_temporaries_are_removed_by_the_next_run(workspace: Path) -> None:
    """Temporaries of a process that died (SIGKILL) go at the next write; the output is group/other readable."""
    dead_pid = 4_194_305  # above Linux's largest pid
    stale = [workspace / f".heights.csv.{dead_pid}-0a1b2c3d.tmp.csv", workspace / ".heights.csv.k3j_x9qz.tmp.csv"]
    for path in stale:
        path.write_text("half a table")
    other = workspace / f".other.csv.{dead_pid}-0a1b2c3d.tmp.csv"
    other.write_text("another target's temporary")
    previous = os.umask(0o022)
    try:
        assert cli.main(COMMANDS["heights"].argv("heights")) == 0
    finally:
        os.umask(previous)
    assert not any(path.exists() for path in stale) and other.exists()
    assert stat.S_IMODE((workspace / "heights.csv").stat().st_mode) == 0o644


def test_centroids_from_mask_ignores_a_centroid_file_that_does_not_match(workspace: Path) -> None:
    _preprocess_wrong_centroids(workspace, "preprocess", COMMANDS["preprocess"])
    argv = [*COMMANDS["preprocess"].argv("preprocess"), "--set", "preprocess.centroids_from=mask"]
    assert cli.main(argv) == 0
    assert (workspace / "result" / "manifest.parquet").is_file()
