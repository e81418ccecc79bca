"""Config files, overrides and validation."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from ddpm_ms.config import (
    DEFAULTS,
    FLOAT_KEYS,
    INT_LIST_KEYS,
    MAX_FLOAT,
    MAX_INT,
    NUMERIC_KEYS,
    load_config,
    packaged_config_dir,
    packaged_configs,
    parse_overrides,
    resolve,
)
from ddpm_ms.utils.errors import UserError

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
    got = (cfg["batch_size"], cfg["epochs"], cfg["timesteps"], cfg["dim"], cfg["dim_mults"])
    assert got == (16, 10, 200, 28, [1, 2, 4])
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


def test_numeric_keys_are_every_key_that_takes_a_number():
    numbers = {k for k, v in DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= set(NUMERIC_KEYS) and len(set(NUMERIC_KEYS)) == len(NUMERIC_KEYS)
    for key in set(DEFAULTS) - set(NUMERIC_KEYS):  # the rest take strings or booleans, never numbers
        with pytest.raises(UserError, match=f"{key!r} must be (a string|true or false|one of: auto, true, false)"):
            resolve({key: 5})


NON_FINITE = ["nan", ".nan", "NaN", "inf", ".inf", "-.inf", "-inf", "1e999", "Infinity"]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_nan_and_inf_are_one_line_errors_for_every_numeric_key(key):
    for text in NON_FINITE:
        value = f"[1, {text}]" if key in INT_LIST_KEYS else text
        with pytest.raises(UserError) as info:
            load_config(None, [f"{key}={value}"])
        message = str(info.value)
        assert f"config key {key!r}" in message and len(message.splitlines()) == 1, message
        if key in FLOAT_KEYS:
            assert "must be a finite number" in message, message


@pytest.mark.parametrize("values, message", [
    ({"lr": 1e39}, "'lr' = 1e[+]39 is beyond the float32 range"),
    ({"loss_scale": -4e38}, "'loss_scale' = -4e[+]38 is beyond the float32 range"),
    ({"timesteps": MAX_INT + 1}, f"'timesteps' = {MAX_INT + 1} is too large"),
    ({"dim_mults": [1, 2**40]}, "'dim_mults' holds a value beyond"),
    ({"seed": 2**32}, "'seed' = 4294967296 is too large"),
    ({"seed": 4294968, "epochs": 10}, "'seed' = 4294968 is too large for 10 epochs.*seed <= 4294967"),
    ({"num_workers": (os.cpu_count() or 1) + 1}, "'num_workers'.*exceeds the .* CPUs"),
    ({"lr": 1e-4, "min_lr": 1e-4}, "'min_lr' .* must be below lr"),
])
def test_absurd_magnitudes_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve(values)


def test_the_largest_sane_values_pass():
    cfg = resolve({"lr": 1e30, "lr_schedule": "constant", "min_lr": 1e30, "loss_scale": MAX_FLOAT,
                   "seed": 4294967, "epochs": 10})  # 4294967 * 1000 + 9 < 2**32
    assert cfg["lr"] == 1e30 and cfg["seed"] == 4294967
    assert resolve({"seed": 0, "epochs": MAX_INT})["epochs"] == MAX_INT


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


def test_packaged_configs_are_the_configs_directory():
    names = sorted(os.path.basename(p)[:-len(".yaml")] for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert packaged_configs() == names
    assert os.path.samefile(packaged_config_dir(), os.path.join(ROOT, "configs"))


def test_packaged_config_dir_prefers_the_installed_layout(tmp_path):
    package = tmp_path / "site" / "ddpm_ms"
    (package / "configs").mkdir(parents=True)
    (tmp_path / "site" / "configs").mkdir()
    assert packaged_config_dir(str(package)) == str(package / "configs")  # installed wheel
    os.rmdir(package / "configs")
    assert packaged_config_dir(str(package)) == str(tmp_path / "site" / "configs")  # checkout
    os.rmdir(tmp_path / "site" / "configs")
    assert packaged_config_dir(str(package)) is None


@pytest.mark.parametrize("name", ["quick", "quick.yaml", "fashion_mnist"])
def test_a_bare_name_loads_the_packaged_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name must resolve to the package's copy
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    assert load_config(name) == load_config(os.path.join(ROOT, "configs", stem + ".yaml"))


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = load_config("quick")
    (tmp_path / "quick.yaml").write_text(f"lr: {packaged['lr'] * 2}\n")
    assert load_config("quick.yaml")["lr"] == packaged["lr"] * 2
    assert load_config("quick") == packaged  # no file named "quick"


def test_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="neither a file nor a packaged config") as info:
        load_config("quik")
    assert str(info.value).endswith("packaged configs: " + ", ".join(packaged_configs()))
    with pytest.raises(UserError, match="quik.yaml does not exist.*packaged config: .*quick"):
        load_config(os.path.join("sub", "quik.yaml"))


def test_dict_overrides_equal_string_overrides():
    strings = ["lr=3e-4", "dim_mults=[1, 2]", "max_steps=5", "random_flip=false", "output-dir=x"]
    typed = {"lr": 3e-4, "dim_mults": [1, 2], "max_steps": 5, "random_flip": False, "output-dir": "x"}
    cfg = load_config("fashion_mnist", typed)
    assert cfg == load_config("fashion_mnist", strings)
    base = load_config("fashion_mnist")
    changed = {k for k in cfg if cfg[k] != base[k]}
    assert changed == {"lr", "dim_mults", "max_steps", "random_flip", "output_dir"}
    assert load_config(None, "max_steps=5")["max_steps"] == 5  # one string, not its characters


@pytest.mark.parametrize("typed, strings", [
    ({"lrr": 1e-3}, ["lrr=1e-3"]),
    ({"sampler": "euler"}, ["sampler=euler"]),
    ({"batch_size": 2.5}, ["batch_size=2.5"]),
    ({"random_flip": "maybe"}, ["random_flip=maybe"]),
    ({"dim_mults": [1, 2, 4], "image_size": 30}, ["dim_mults=[1, 2, 4]", "image_size=30"]),
])
def test_dict_overrides_are_validated_like_string_overrides(typed, strings):
    errors = []
    for overrides in (typed, strings):
        with pytest.raises(UserError) as info:
            load_config("quick", overrides)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_setup_installs_the_configs_as_package_data(tmp_path):
    # build_py lays the package out as a wheel or `pip install .` does; run it on a copy of the
    # sources so that no build/ or egg-info directory lands in the checkout
    src = tmp_path / "src"
    for name in ("ddpm_ms", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                   cwd=src, check=True, capture_output=True)
    installed = tmp_path / "lib" / "ddpm_ms" / "configs"
    assert sorted(p.name for p in installed.glob("*.yaml")) == [n + ".yaml" for n in packaged_configs()]
    assert packaged_config_dir(str(tmp_path / "lib" / "ddpm_ms")) == str(installed)
