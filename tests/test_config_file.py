"""Tests for models.config_file: retailer config files, validated at start-up with clear errors."""
import json
import os

import pytest
import yaml

from models.config import DEFAULT_CONFIG, RecsConfig, RulesConfig, ScoringConfig
from models.config_file import (ConfigError, config_from_dict, config_to_dict, dump_yaml,
                                load_config, main)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def write(tmp_path, text, name="retailer.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(tmp_path, text, name="retailer.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(path), message  # every message names the file first
    return message


# --- defaults and overrides ------------------------------------------------------------

def test_no_file_gives_the_built_in_defaults():
    assert load_config(None) is DEFAULT_CONFIG


def test_default_yaml_is_exactly_the_built_in_config():
    assert load_config(os.path.join(CONFIGS, "default.yaml")) == DEFAULT_CONFIG


def test_default_yaml_names_every_key():
    """A field added to models/config.py must be added to configs/default.yaml too."""
    with open(os.path.join(CONFIGS, "default.yaml"), encoding="utf-8") as handle:
        assert yaml.safe_load(handle) == config_to_dict(DEFAULT_CONFIG)


def test_completejourney_config_is_a_grocer_without_fitment():
    config = load_config(os.path.join(CONFIGS, "completejourney.yaml"))
    assert config.segment_attributes == ("income", "age", "household_size")
    assert config.fitment_attributes == ()
    assert config.rules.recs_per_user == 4
    assert config.rules.service_sku_patterns == ()
    assert 1.0 <= config.rules.min_price <= 3.0
    assert config.levels[-1] == () and len(config.levels) == 4


def test_a_file_overrides_only_what_it_names(tmp_path):
    config = load_config(write(tmp_path, "rules:\n  min_price: 2.5\n"))
    assert config.rules.min_price == 2.5
    assert config.rules.recs_per_user == DEFAULT_CONFIG.rules.recs_per_user
    assert config.scoring == DEFAULT_CONFIG.scoring
    assert config.segment_attributes == DEFAULT_CONFIG.segment_attributes


def test_empty_file_and_empty_section_keep_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == DEFAULT_CONFIG
    assert load_config(write(tmp_path, "# only a comment\nrules:\n", "b.yaml")) == DEFAULT_CONFIG


def test_lists_become_tuples_and_ints_are_numbers(tmp_path):
    config = load_config(write(tmp_path, "segment_attributes: [income, age]\n"
                                         "fitment_attributes: []\n"
                                         "scoring: {half_life_days: 7}\n"))
    assert config.segment_attributes == ("income", "age")
    assert config.fitment_attributes == ()
    assert config.scoring.half_life_days == 7.0 and isinstance(config.scoring.half_life_days,
                                                               float)
    assert config.level_name(config.levels[0]) == "income+age"


def test_json_files_work_too(tmp_path):
    path = write(tmp_path, json.dumps({"rules": {"recs_per_user": 6}}), "retailer.json")
    assert load_config(path).rules.recs_per_user == 6


def test_config_to_dict_round_trips_a_non_default_config():
    config = RecsConfig(segment_attributes=("a", "b"), fitment_attributes=(),
                        scoring=ScoringConfig(half_life_days=12.5, cart_weight=2.0),
                        rules=RulesConfig(min_price=1.0, excluded_tags=(),
                                          service_sku_patterns=("X-*",)))
    data = config_to_dict(config)
    assert data["rules"]["excluded_tags"] == [] and data["fitment_attributes"] == []
    assert config_from_dict(data) == config
    assert config_from_dict(yaml.safe_load(dump_yaml(config))) == config


# --- each bad config gets its own clear error ------------------------------------------

def test_unknown_top_level_key_names_the_allowed_keys_and_the_closest(tmp_path):
    message = error_of(tmp_path, "segment_atributes: [income]\n")
    assert "unknown key 'segment_atributes'" in message
    assert "allowed keys at the top level: segment_attributes, fitment_attributes, scoring, " \
           "rules" in message
    assert "did you mean 'segment_attributes'?" in message


def test_unknown_nested_key_names_the_path_and_the_closest(tmp_path):
    message = error_of(tmp_path, "rules:\n  min_prce: 2\n")
    assert "unknown key 'rules.min_prce'" in message
    assert "allowed keys in 'rules': min_price, recs_per_user" in message
    assert "did you mean 'rules.min_price'?" in message


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    message = error_of(tmp_path, "scoring:\n  zzz: 1\n")
    assert "unknown key 'scoring.zzz'" in message and "did you mean" not in message


@pytest.mark.parametrize("text, expected", [
    ("rules:\n  min_price: cheap\n",
     "'rules.min_price' must be a number, got string 'cheap'"),
    ("rules:\n  recs_per_user: 4.5\n",
     "'rules.recs_per_user' must be an integer, got number 4.5"),
    ("rules:\n  recs_per_user: true\n",
     "'rules.recs_per_user' must be an integer, got boolean True"),
    ("scoring:\n  half_life_days: null\n",
     "'scoring.half_life_days' must be a number, got null"),
    ("rules:\n  excluded_tags: refurbished\n",
     "'rules.excluded_tags' must be a list of strings, got string 'refurbished' "
     "(write [refurbished] for one item, [] for none)"),
    ("segment_attributes: [income, 3]\n",
     "'segment_attributes[1]' must be a string, got integer 3"),
    ("rules: 5\n", "'rules' must be a mapping of keys to values, got integer 5"),
    ("- income\n", "the top level must be a mapping of keys to values, got list"),
    ("rules:\n  min_price: 1e2\n", "write 100 or 1.0e2"),
])
def test_wrong_type_names_the_key_path_expected_and_got(tmp_path, expected, text):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize("text, expected", [
    ("rules:\n  min_price: -1\n",
     "impossible value for 'rules.min_price': min_price must be >= 0"),
    ("rules:\n  recs_per_user: 0\n",
     "impossible value for 'rules.recs_per_user': recs_per_user must be >= 1"),
    ("scoring:\n  cart_weight: 0.1\n",
     "impossible value for 'scoring.cart_weight', 'scoring.view_weight': need cart_weight >= "
     "view_weight >= 0"),
    ("scoring:\n  half_life_days: .nan\n",
     "impossible value for 'scoring.half_life_days': half_life_days must be > 0"),
    ("segment_attributes: [income, income]\n",
     "impossible value for 'segment_attributes': segment_attributes has a repeated name"),
])
def test_impossible_value_reuses_the_dataclass_check_with_the_key_path(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_bad_yaml_syntax_gives_line_and_column(tmp_path):
    message = error_of(tmp_path, "rules:\n  min_price: [2\n  recs_per_user: 4\n")
    assert "YAML syntax error at line" in message


def test_key_given_twice_is_an_error_not_a_silent_override(tmp_path):
    message = error_of(tmp_path, "rules:\n  min_price: 2\n  min_price: 3\n")
    assert "key 'min_price' given twice" in message


def test_bad_json_syntax_gives_line_and_column(tmp_path):
    message = error_of(tmp_path, '{"rules": {"min_price": 2,}}', "retailer.json")
    assert "JSON syntax error at line 1" in message


def test_file_not_found(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file '{missing}' not found"):
        load_config(missing)


def test_config_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_config(write(tmp_path, "rules: {min_price: -5}\n"))


def test_cli_checks_a_file(tmp_path, capsys):
    assert main([os.path.join(CONFIGS, "completejourney.yaml")]) == 0
    assert "fitment_attributes: []" in capsys.readouterr().out
    assert main([write(tmp_path, "rules: {min_prce: 1}\n")]) == 1
    assert "did you mean 'rules.min_price'?" in capsys.readouterr().err
