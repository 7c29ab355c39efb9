"""Config: defaults < YAML < --set, unknown keys and bad values named, the template round-trips."""

import pytest
import yaml

from stillhouse.config import CONFIG_NAME, Config, config_yaml_template, load_config, parse_overrides
from stillhouse.errors import StillhouseError


def write(ws, text):
    (ws / CONFIG_NAME).write_text(text)


def test_defaults_yaml_and_set_precedence(tmp_path):
    write(tmp_path, "train:\n  steps: 50\n  alpha: 0.3\n")
    cfg = load_config(tmp_path, ["train.steps=70", "license.accept=[gemma, llama3]"])
    assert cfg.train.steps == 70  # --set beats YAML
    assert cfg.train.alpha == 0.3  # YAML beats default
    assert cfg.train.batch_size == Config().train.batch_size  # default
    assert cfg.license.accept == ["gemma", "llama3"]  # --set values are YAML
    assert cfg.workspace == tmp_path.resolve()


def test_unknown_key_names_key_and_allowed(tmp_path):
    write(tmp_path, "train:\n  stepz: 5\n")
    with pytest.raises(StillhouseError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert "train.stepz" in msg and "steps" in msg and "alpha" in msg


def test_unknown_section(tmp_path):
    write(tmp_path, "trian: {}\n")
    with pytest.raises(StillhouseError, match=r"unknown key 'trian'.*train"):
        load_config(tmp_path)


def test_bad_value_names_allowed_values(tmp_path):
    write(tmp_path, "train:\n  divergence: kl\n")
    with pytest.raises(StillhouseError) as e:
        load_config(tmp_path)
    assert "train.divergence" in str(e.value) and "forward_kl" in str(e.value)


def test_bad_number_via_set(tmp_path):
    write(tmp_path, "")
    with pytest.raises(StillhouseError, match="train.alpha"):
        load_config(tmp_path, ["train.alpha=1.5"])


def test_malformed_yaml_names_line(tmp_path):
    write(tmp_path, "train:\n  steps: 5\n bad: [\n")
    with pytest.raises(StillhouseError, match=r"stillhouse.yaml line \d+: not valid YAML"):
        load_config(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(StillhouseError, match="not found; create one with `stillhouse -w .* init`"):
        load_config(tmp_path)


def test_set_without_equals():
    with pytest.raises(StillhouseError, match="section.key=value"):
        parse_overrides(["train.steps"])


def test_template_is_valid_and_commented(tmp_path):
    text = config_yaml_template()
    assert text.count("#") > 20  # fields carry their descriptions
    write(tmp_path, text)
    cfg = load_config(tmp_path)
    assert cfg.model_dump() == Config().model_dump()
    assert set(yaml.safe_load(text)) == {k for k, f in Config.model_fields.items() if not f.exclude}


def test_a_kind_set_on_the_command_line_keeps_the_files_one_word_action_as_default(tmp_path):
    from stillhouse.config import load_config

    (tmp_path / "stillhouse.yaml").write_text("prep:\n  pii_action: pseudonymize\n")
    cfg = load_config(tmp_path, ["prep.pii_action.CARD=drop"])
    assert cfg.prep.pii_action == {"default": "pseudonymize", "CARD": "drop"}
