"""Config files, overrides and validation."""

import glob
import os

import pytest

from ddpm_ms.config import DEFAULTS, load_config, parse_overrides, resolve
from ddpm_ms.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))) + sorted(
    glob.glob(os.path.join(ROOT, "tests", "configs", "*.yaml")))


def test_there_are_config_files():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"fashion_mnist.yaml", "quick.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_parses_and_validates(path):
    cfg = load_config(path)
    assert set(cfg) == set(DEFAULTS)


def test_tutorial_config_has_the_tutorial_values():
    cfg = load_config(os.path.join(ROOT, "configs", "fashion_mnist.yaml"))
    assert (cfg["batch_size"], cfg["epochs"], cfg["timesteps"], cfg["dim"], cfg["dim_mults"]) == (16, 10, 200, 28, [1, 2, 4])
    assert (cfg["lr"], cfg["min_lr"], cfg["loss_type"], cfg["loss_scale"]) == (1e-4, 1e-7, "huber", 65536)


def test_overrides_win_and_are_parsed_as_yaml():
    cfg = load_config(os.path.join(ROOT, "configs", "fashion_mnist.yaml"), ["lr=3e-4", "dim_mults=[1, 2]",
                                                                             "max_steps=5", "random_flip=false"])
    assert cfg["lr"] == 3e-4 and cfg["dim_mults"] == [1, 2] and cfg["max_steps"] == 5 and cfg["random_flip"] is False
    assert parse_overrides(["output-dir=x"]) == {"output_dir": "x"}


@pytest.mark.parametrize("values, message", [
    ({"lrr": 1e-3}, "unknown config key 'lrr'.*did you mean 'lr'"),
    ({"lr": -1.0}, "'lr' must be > 0"),
    ({"lr": "fast"}, "'lr' must be a number"),
    ({"batch_size": 2.5}, "'batch_size' must be an integer"),
    ({"beta_schedule": "cubic"}, "'beta_schedule' = 'cubic' is not one of"),
    ({"loss_type": "l3"}, "'loss_type'"),
    ({"sampler": "euler"}, "'sampler'"),
    ({"device": "TPU"}, "'device'"),
    ({"image_size": 30, "dim_mults": [1, 2, 4]}, "image_size 30 must be divisible by 4"),
    ({"eta": 1.5}, "'eta' must be in"),
    ({"random_flip": "yes"}, "true or false"),
    ({"sample_steps": 2000, "timesteps": 1000}, "exceeds timesteps"),
    ({"attn_levels": [5]}, "attn_levels"),
    ({"block_type": "resnet", "dim": 28, "resnet_groups": 8}, "resnet_groups 8 must divide"),
])
def test_invalid_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve(values)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        load_config(str(unknown))
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["lr"])
