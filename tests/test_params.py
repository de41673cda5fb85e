"""params.yaml against the typed model, and bad settings refused by the CLI before a stage runs."""

from pathlib import Path

import pytest
import yaml

from healthivert.cli import main
from healthivert.config import Params, load_params
from healthivert.tracking.pipeline import flatten

REPO = Path(__file__).resolve().parents[1]


def test_params_file_validates_and_lists_every_key() -> None:
    """DVC only tracks keys written in params.yaml, so the file must spell out every setting."""
    params = load_params(REPO / "params.yaml")
    written = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    expected = flatten(Params().model_dump(mode="json"))
    assert sorted(written) == sorted(expected)
    assert params.tracking.enabled is True


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("rhlv.central_fractoin=0.3", "unknown key 'rhlv.central_fractoin' (did you mean 'rhlv.central_fraction'?)"),
        ("rhlv.central_fraction=wide", "invalid value for 'rhlv.central_fraction'"),
        ("rhlv.central_fraction=0.9", "invalid value for 'rhlv.central_fraction'"),
        ("trackng.enabled=false", "unknown key 'trackng'"),
        ("tracking.enabled=maybe", "invalid value for 'tracking.enabled'"),
    ],
)
def test_cli_rejects_bad_setting_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                setting: str, message: str) -> None:
    out = tmp_path / "rhlv"
    argv = ["rhlv", "--data", str(tmp_path / "absent"), "--synth", str(tmp_path / "absent"), "--out", str(out),
            "--params", str(REPO / "params.yaml"), "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("healthivert rhlv: error: ")
    assert message in err
    assert not out.exists()


def test_cli_rejects_unknown_key_in_a_layered_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("svm_fit:\n  c_gird: [1.0]\n")
    argv = ["svm-fit", "--rhlv", str(tmp_path / "rhlv.parquet"), "--out", str(tmp_path / "svm"),
            "--params", str(REPO / "params.yaml"), "--params", str(override)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(override) in err and "unknown key 'svm_fit.c_gird' (did you mean 'svm_fit.c_grid'?)" in err
    assert not (tmp_path / "svm").exists()
