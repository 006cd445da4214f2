import pytest

from smft_dist.config import ConfigError, load_config, validate

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_yaml_and_dotlist_overrides():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["optim.lr=2", "model.memory_layers=[1,3]"])
    assert cfg.optim.lr == 2.0 and cfg.model.memory_layers == [1, 3] and cfg.model.hidden_size == 128


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  hidden_sise: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.hidden_sise"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lr"):
        load_config(p)


def test_unknown_override_and_malformed_override():
    with pytest.raises(ConfigError, match="command-line override.*optim.lrr"):
        load_config(None, ["optim.lrr=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_base_includes(tmp_path):
    (tmp_path / "run.yaml").write_text(f"base: [{ROOT / 'configs/model/tiny.yaml'}]\nsteps: 7\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.steps == 7 and cfg.model.memory_n_keys == 128


@pytest.mark.parametrize("override,match", [
    (["model.memory_knn=200"], "memory_knn"),
    (["model.memory_layers=[9]"], "memory_layers"),
    (["model.memory_k_dim=63"], "memory_k_dim"),
    (["data.batch_size=0"], "data.batch_size"),
    (["selection.mode=idf"], "selection.mode"),
    (["dist.engine=deepspeed", "dist.zero_stage=3"], "zero_stage"),
])
def test_validation_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/model/tiny.yaml", override)


def test_world_size_arithmetic():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["dist.dp_replicate=2", "dist.mp=4"])
    with pytest.raises(ConfigError, match=r"dp_replicate 2 x dist.mp 4 = 8 != world size 6"):
        validate(cfg, world_size=6)
    validate(cfg, world_size=8)
    small = load_config(ROOT / "configs/model/tiny.yaml", ["model.memory_n_keys=2", "model.memory_knn=1"])
    with pytest.raises(ConfigError, match="exceeds the slot count 4"):
        validate(small, world_size=8)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for d in ("model", "tiny", "paper")
                                         for p in (ROOT / "configs" / d).glob("*.yaml")))
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(ROOT / path)
    if "paper" in path:  # the paper's model, checked on the meta device (nothing allocated)
        from smft_dist.model.inspect import inspect_model

        info = inspect_model(cfg.model, mp=8)
        assert info["memory_slots"] == 1048576 and info["value_dim"] == 1024
