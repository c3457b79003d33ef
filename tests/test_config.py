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


@pytest.mark.parametrize("uri", ["https://example.org/mine.zip", "s3://bucket/mine.zip", "gdrive://abc123",
                                 "https://drive.google.com/file/d/abc123/view"])
def test_a_remote_archive_without_sha256_is_refused_naming_the_key(params_file, uri):
    with pytest.raises(ConfigError) as info:
        load_params(params_file, [f"data.archives.Mine={{uri: '{uri}'}}"])
    assert f"{params_file}: data.archives.Mine.sha256: " in str(info.value)
    assert "required for a remote uri" in str(info.value)


@pytest.mark.parametrize("uri", ["~/faces", "/data/faces", "faces.zip", "file:///data/faces.zip"])
def test_a_local_archive_or_folder_may_leave_out_sha256_and_size(params_file, uri):
    spec = load_params(params_file, [f"data.archives.MyFaces.uri={uri}"]).data.archive("MyFaces")
    assert (spec.uri, spec.sha256, spec.size) == (uri, None, None)
    with pytest.raises(ConfigError, match="data.archives.MyFaces.sha256: .*must be a sha256 digest"):
        load_params(params_file, [f"data.archives.MyFaces.uri={uri}", "data.archives.MyFaces.sha256=abc"])


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


# ---------------------------------------------------------------- values that validate, then fail later


@pytest.mark.parametrize("override, key", [
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),  # 2**32: numpy's legacy seeding refuses it
    ("seed=12345678901234567890", "seed"),
    ("prepare.split.seed=-1", "prepare.split.seed"),
    ("demo.seed=-5", "demo.seed"),
])
def test_seeds_outside_what_numpy_and_torch_take_are_refused(params_file, override, key):
    with pytest.raises(ConfigError) as info:
        load_params(params_file, [override])
    assert f"{params_file}: {key}:" in str(info.value)


def test_seed_range_ends_are_accepted(params_file):
    assert load_params(params_file, ["seed=0"]).seed == 0
    assert load_params(params_file, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("override, key", [
    ("train.full_stage.lr=.inf", "train.full_stage.lr"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    ("fetch.max_backoff_s=.inf", "fetch.max_backoff_s"),
    ("train.optimizer.weight_decay=.nan", "train.optimizer.weight_decay"),
    ("registry.min_delta=.inf", "registry.min_delta"),
    ("train.augment.scale=[.nan, 1.0]", "train.augment.scale.0"),
])
def test_non_finite_floats_are_refused(params_file, override, key):
    with pytest.raises(ConfigError) as info:
        load_params(params_file, [override])
    assert f"{params_file}: {key}:" in str(info.value) and "finite" in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=true", "train.batch_size"),
    ("fetch.retries=false", "fetch.retries"),
    ("seed=true", "seed"),
    ("evaluate.batch_size=true", "evaluate.batch_size"),
    ("train.max_steps_per_epoch=true", "train.max_steps_per_epoch"),
    ("train.full_stage.epochs=true", "train.full_stage.epochs"),
    ("prepare.image_sizes=[true]", "prepare.image_sizes"),
    ("data.archives.LFW-FER.size=true", "data.archives.LFW-FER.size"),
    ("train.layer_decay=true", "train.layer_decay"),
    ("train.augment.scale=[true, 1.0]", "train.augment.scale"),
])
def test_booleans_are_not_numbers(params_file, override, key):
    with pytest.raises(ConfigError) as info:
        load_params(params_file, [override])
    assert f"{params_file}: {key}" in str(info.value) and "true/false" in str(info.value)


def test_numbers_keep_their_usual_spellings(params_file):
    params = load_params(params_file, ["train.layer_decay=1", "train.full_stage.lr=1e-3", "fetch.progress=false"])
    assert params.train.layer_decay == 1.0 and isinstance(params.train.layer_decay, float)
    assert params.train.full_stage.lr == 1e-3  # PyYAML reads 1e-3 as a string; still a number here
    assert params.fetch.progress is False


def test_params_file_not_utf8_names_the_file(tmp_path, params_file):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(params_file.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    message = str(info.value)
    assert str(bad) in message and "UTF-8" in message and "\n" not in message
