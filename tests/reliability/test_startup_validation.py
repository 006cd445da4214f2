"""Start-up validation: every inconsistent config fails in `validate` / `check_paths` with a
ConfigError naming the key, before any model, process group or file is made."""
import os
import subprocess

import numpy as np
import pytest

from smft_dist.config import ConfigError, DistConfig, check_paths, validate
from smft_dist.data.mds import write_mds
from smft_dist.distributed.context import _sizes
from tests.conftest import ROOT
from tests.reliability.conftest import TRAIN, config_args, small_config

CASES = {  # id -> (overrides, world size, words the error must contain)
    "n_keys_zero": (["model.memory_n_keys=0"], None, ["model.memory_n_keys=0", "slots = n_keys^2"]),
    "knn_above_n_keys": (["model.memory_knn=17"], None, ["model.memory_knn=17", "memory_n_keys=16"]),
    "odd_k_dim": (["model.memory_k_dim=15"], None, ["model.memory_k_dim=15", "even"]),
    "layer_out_of_range": (["model.memory_layers=[2]"], None, ["model.memory_layers contains 2", "[0, 2)"]),
    "duplicate_layers": (["model.memory_layers=[1,1]"], None, ["duplicates"]),
    "value_dim_zero": (["model.memory_value_dim=0"], None, ["model.memory_value_dim=0"]),
    "attention_heads_zero": (["model.num_attention_heads=0"], None, ["model.num_attention_heads=0"]),
    "kv_heads_not_dividing": (["model.num_key_value_heads=3"], None, ["model.num_key_value_heads=3"]),
    "batch_size_zero": (["data.batch_size=0"], None, ["data.batch_size=0"]),
    "seq_len_over_positions": (["data.seq_len=512"], None, ["data.seq_len=512", "max_position_embeddings"]),
    "negative_every": (["checkpoint.every=-1"], None, ["checkpoint.every=-1"]),
    "timeout_zero": (["dist.timeout_s=0"], None, ["dist.timeout_s"]),
    "max_nonfinite_zero": (["optim.max_nonfinite_steps=0"], None, ["optim.max_nonfinite_steps=0"]),
    "unknown_engine": (["dist.engine=ddp"], None, ["dist.engine='ddp'"]),
    "zero_stage_3": (["dist.engine=deepspeed", "dist.zero_stage=3"], None, ["dist.zero_stage=3"]),
    "mp_over_slots": (["model.memory_n_keys=1", "model.memory_knn=1"], 2, ["dist.mp=2", "slot count 1"]),
    "mp_not_dividing_world": (["dist.mp=2", "dist.dp_replicate=2"], 2, ["2 x dist.mp 2 = 4 != world size 2"]),
    "replicate_not_dividing_world": (["dist.dp_replicate=3"], 2, ["dist.dp_replicate 3", "!= world size 2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_names_the_key(case):
    overrides, world, words = CASES[case]
    with pytest.raises(ConfigError) as e:
        validate(small_config(*overrides), world)  # load_config validates too (without the world)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_parallel_sizes_checked_before_the_rendezvous():
    with pytest.raises(ConfigError, match=r"dp_replicate 3 x mp 1 = 3 != world 2"):
        _sizes(DistConfig(dp_replicate=3), 2)


def test_valid_config_passes():
    validate(small_config(), 2)


@pytest.mark.parametrize("key", ["data.train", "model.init_from", "selection.df_path", "dist.deepspeed_config",
                                 "checkpoint.resume"])
def test_missing_paths_name_the_key(key, tmp_path):
    cfg = small_config()
    cfg.data.train = str(ROOT / "tests")  # exists but is not MDS data
    if key != "data.train":
        cfg.data.train = None
        cfg.mode = "background_index"
        cfg.data.background = str(tmp_path)
        one_sample = {"input_ids": np.zeros(4, np.int32), "attention_mask": np.ones(4, np.uint8),
                      "loss_mask": np.ones(4, np.uint8)}
        write_mds(tmp_path, [one_sample])  # real MDS data: check_paths reads index.json and the shard headers
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_paths(cfg)


def test_no_data_configured_names_the_key():
    cfg = small_config()
    cfg.data.train = None
    with pytest.raises(ConfigError, match=r"mode=pretrain needs data: set data\.train"):
        check_paths(cfg)


def test_bad_path_fails_before_any_process_group_work(rel_data, tmp_path):
    """Rank 0 of a 2-rank world started alone, with dist.timeout_s=600: had it entered the
    rendezvous it would wait for rank 1 for 10 minutes. It must exit 2 right away instead."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([*TRAIN, *config_args("pretrain", tmp_path, rel_data, f"model.init_from={tmp_path}/nowhere",
                                             "dist.timeout_s=600")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: model.init_from="), r.stderr
    assert not (tmp_path / "config.yaml").exists()
