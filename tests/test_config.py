from pathlib import Path

import pytest
import yaml

from ferflow.config import Params, load_params
from ferflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_file(tmp_path):
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_repo_params_name_the_real_archives():
    params = load_params(REPO / "params.yaml")
    by_name = {a.name: a for a in params.data.specs}
    assert set(by_name) == {"LFW-FER", "M-LFW-FER", "M-LFW-FER-face-cut"}
    assert by_name["LFW-FER"].sha256.startswith("c93674d5")
    assert by_name["M-LFW-FER"].size == 99_019_683
    assert all(a.uri.startswith("https://media.githubusercontent.com/") for a in by_name.values())


def test_overrides_reach_nested_keys_and_list_items(params_file):
    params = load_params(
        params_file,
        ["fetch.retries=1", "prepare.image_sizes=[112, 64]", "data.archives.M-LFW-FER.uri=/tmp/x.zip",
         "prepare.split.seed=7"],
    )
    assert params.fetch.retries == 1
    assert params.prepare.image_sizes == [64, 112]
    assert params.data.archive("M-LFW-FER").uri == "/tmp/x.zip"
    assert params.prepare.split.seed == 7


def test_params_are_frozen(params_file):
    params = load_params(params_file)
    with pytest.raises(Exception):
        params.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, key",
    [
        ("fetch.retries=lots", "fetch.retries"),
        ("prepare.max_bad_fraction=2", "prepare.max_bad_fraction"),
        ("prepare.colour=red", "prepare.colour"),
        ("data.archives.LFW-FER.sha256=abc", "data.archives.LFW-FER.sha256"),
        ("data.archives.LFW-FER.mirror=x", "data.archives.LFW-FER.mirror"),
    ],
)
def test_bad_values_name_the_key(params_file, override, key):
    with pytest.raises(ConfigError) as info:
        load_params(params_file, [override])
    assert f"{params_file}: {key}:" in str(info.value)
    assert info.value.exit_code == 2


def test_bad_override_syntax_and_index(params_file):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_params(params_file, ["fetch.retries"])
    with pytest.raises(ConfigError, match="list index must be 0..1"):
        load_params(params_file, ["prepare.image_sizes.3=64"])
    assert load_params(params_file, ["prepare.image_sizes.0=64"]).prepare.image_sizes == [64, 260]


def test_archive_names_must_be_portable(params_file):
    with pytest.raises(ConfigError, match="data.archives: .*'../evil'"):
        load_params(params_file, ["data.archives={'../evil': {uri: x, sha256: '" + "0" * 64 + "'}}"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)
    bad.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_params(bad)


def test_params_schema_roundtrip(params_file):
    params = load_params(params_file)
    assert Params.model_validate(params.model_dump(mode="json")) == params
