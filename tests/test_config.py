import pytest

from dpt_fast.config import PRESETS, load_config, parse_override
from dpt_fast.utils import UserError


def test_default_preset_is_mnist5k():
    cfg = load_config()
    assert cfg.name == "mnist5k" and cfg.data.name == "mnist5k"


def test_digits_preset_and_issue_key_names():
    cfg = load_config(
        "digits",
        ["seed=3", "split.labels_per_class=2", "split.seed=1", "train.steps=7", "train.batch_size=16",
         "sample.steps=4", "gen.k_per_class=3"],
    )
    assert (cfg.seed, cfg.split.labels_per_class, cfg.split.seed) == (3, 2, 1)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.sample.steps, cfg.gen.k_per_class) == (7, 16, 4, 3)
    assert cfg.data.name == "digits"


def test_override_values_are_typed():
    cfg = load_config("digits", ["train.lr=1e-3", "train.betas=[0.9, 0.999]", "model.conv=false"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.betas == (0.9, 0.999)
    assert cfg.model.conv is False


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("train.stepz=3", "did you mean 'train.steps'"),
        ("nosuch=1", "unknown config key 'nosuch'"),
        ("train.steps=abc", "config key 'train.steps': expected int"),
        ("train.steps=-1", "'train.steps' must be >= 0"),
        ("sample.method=euler", "'sample.method': 'euler' is not one of"),
        ("train=3", "is a section"),
        ("split.labels_per_class", "overrides are key=value"),
        ("train.betas=[0.9]", "expected a list of 2"),
        ("sample.t_end=-0.1", "'sample.t_end' must be in [0, 1)"),
        ("eval.cas_steps=-1", "'eval.cas_steps' must be >= 0"),
    ],
)
def test_bad_overrides_are_one_line_errors(item, fragment):
    with pytest.raises(UserError) as e:
        load_config("digits", [item])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_file_starts_from_its_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("preset: digits\ntrain:\n  steps: 11\n")
    cfg = load_config(str(f), ["seed=5"])
    assert cfg.name == "mine" and cfg.data.name == "digits" and cfg.train.steps == 11 and cfg.seed == 5


def test_bad_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(str(f))


def test_unknown_preset_suggests_one():
    with pytest.raises(UserError, match="did you mean 'digits'"):
        load_config("digit")


def test_fingerprint_tracks_only_named_sections():
    a = load_config("digits")
    b = load_config("digits", ["train.steps=99"])
    assert a.fingerprint("data", "split") == b.fingerprint("data", "split")
    assert a.fingerprint("train") != b.fingerprint("train")


def test_parse_override_nests_dotted_keys():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert set(PRESETS) >= {"mnist5k", "digits"}
