"""Typed parameters: layering, overrides, and one-line errors for unknown or ill-typed keys."""

from pathlib import Path

import pytest

from healthivert.config import Params, dump_params, load_params
from healthivert.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(dump_params(Params()))
    assert load_params(path) == Params()


def test_later_files_and_overrides_win(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train_coarse:\n  lr: 0.001\n  epochs: 3\n")
    full = tmp_path / "full.yaml"
    full.write_text("model:\n  size: full\ntrain_coarse:\n  epochs: 7\n")
    params = load_params([base, full], ["train_coarse.batch_size=2", "svm_fit.c_grid=[1, 2]"])
    assert params.model.size == "full"
    assert params.model.network.cnum == 16
    assert params.train_coarse.lr == pytest.approx(0.001)
    assert params.train_coarse.epochs == 7
    assert params.train_coarse.batch_size == 2
    assert params.svm_fit.c_grid == (1.0, 2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train_coarse:\n  lr_rate: 1\n", "unknown key 'train_coarse.lr_rate' (did you mean 'train_coarse.lr'?)"),
        ("nonsense_section: {}\n", "unknown key 'nonsense_section'"),
        ("train_fine:\n  batch_size: many\n", "invalid value for 'train_fine.batch_size'"),
        ("model:\n  size: huge\n", "invalid value for 'model.size'"),
        ("- a list\n", "expected a mapping of sections"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_params_give_one_line_error_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_params(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params([], ["no_equals_sign"])


def test_section_digest_tracks_values() -> None:
    a = Params().train_coarse
    b = load_params([], ["train_coarse.lr=0.1"]).train_coarse
    assert a.digest() == Params().train_coarse.digest()
    assert a.digest() != b.digest()


def test_repository_params_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model.size in params.model.sizes


@pytest.mark.parametrize("section", ["train_coarse", "train_fine", "synthesize"])
@pytest.mark.parametrize(("views", "message"), [("[]", "list at least one view"),
                                                ("[coronal, sagittal, coronal]", "coronal listed more than once")])
def test_views_must_be_distinct_and_not_empty(section: str, views: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(REPO / "params.yaml", [f"{section}.views={views}"])
    assert f"invalid value for '{section}.views'" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_full_configuration_trains_and_fuses_both_views() -> None:
    params = load_params([REPO / "params.yaml", REPO / "configs" / "full.yaml"])
    assert params.model.size == "full"
    assert params.train_coarse.views == params.train_fine.views == params.synthesize.views == ("sagittal", "coronal")
    assert load_params(REPO / "params.yaml").train_coarse.views == ("sagittal",)
