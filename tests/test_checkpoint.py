"""Checkpoint files: round trip, atomic rotation, corruption fallback, architecture checks."""

import ddpm_ms  # noqa: F401

import os

import numpy as np
import pytest
from mindspore import Parameter, Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.config import ARCH_KEYS, resolve
from ddpm_ms.utils.errors import UserError
from ddpm_ms.factory import create_model
from ddpm_ms.pipeline import load


def groups(value):
    return {"model": {"a.weight": Parameter(Tensor(np.full((2, 3), value, np.float32)), name="w")},
            "state": {"count": Tensor(np.array(value, np.int64))}}


def test_round_trip_with_metadata(tmp_path):
    path = str(tmp_path / "c.ckpt")
    ckpt.save(path, groups(3), {"step": 7, "config": {"dim": 8}, "rng": {"state": 2**100}})
    loaded, meta = ckpt.load(path)
    assert meta["step"] == 7 and meta["config"] == {"dim": 8} and meta["rng"]["state"] == 2**100
    assert np.array_equal(loaded["model"]["a.weight"].asnumpy(), np.full((2, 3), 3, np.float32))
    assert int(loaded["state"]["count"].asnumpy()) == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_manager_keeps_last_k_and_falls_back_on_corruption(tmp_path, capsys):
    manager = ckpt.CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        manager.save(step, groups(step), {"step": step})
    assert [os.path.basename(p) for p in manager.list()] == ["ckpt_step00000002.ckpt", "ckpt_step00000003.ckpt"]
    newest = manager.list()[-1]
    os.chmod(newest, 0o600)
    with open(newest, "r+b") as f:  # flip bytes in the middle of the newest file
        f.seek(os.path.getsize(newest) // 2)
        f.write(b"\xff\xff\xff\xff")
    path, loaded, meta = manager.load_latest()
    assert meta["step"] == 2 and path.endswith("ckpt_step00000002.ckpt")
    assert "corrupt" in capsys.readouterr().err


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    path = str(tmp_path / "c.ckpt")
    ckpt.save(path, groups(1), {"step": 1})
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or unreadable"):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(str(tmp_path / "nope.ckpt"))


def tiny_config():
    return resolve({"dim": 8, "init_dim": 8, "dim_mults": [1, 2], "block_type": "resnet", "resnet_groups": 4,
                    "attn_levels": [], "timesteps": 10})


def test_model_rebuilt_from_checkpoint_and_architecture_checked(tmp_path):
    cfg = tiny_config()
    model = create_model(cfg)
    params = ckpt.named_params(model)
    path = str(tmp_path / "m.ckpt")
    ckpt.save(path, {"model": params, "ema": params}, {"config": cfg})
    rebuilt, sched, cfg2 = load(path)[:3]
    assert cfg2 == cfg and sched.num_timesteps == 10
    for name, p in ckpt.named_params(rebuilt).items():
        assert np.array_equal(p.asnumpy(), params[name].asnumpy())
    other = dict(cfg, dim=16, init_dim=16)
    with pytest.raises(ckpt.CheckpointError, match="another architecture.*dim: checkpoint 8 vs config 16"):
        ckpt.check_compatible({"config": cfg}, other, ARCH_KEYS, path)
    saved = ckpt.load(path)[0]["model"]
    with pytest.raises(ckpt.CheckpointError, match="model tensor init_conv.weight has shape"):
        ckpt.assign(ckpt.named_params(create_model(other)), saved, "model", path)
    deeper = create_model(dict(cfg, dim_mults=[1, 2, 2]))
    with pytest.raises(ckpt.CheckpointError, match="does not match the model: .* missing"):
        ckpt.assign(ckpt.named_params(deeper), saved, "model", path)


def test_load_model_takes_a_run_directory_and_uses_its_newest_checkpoint(tmp_path):
    cfg = tiny_config()
    params = ckpt.named_params(create_model(cfg))
    run = tmp_path / "run"
    manager = ckpt.CheckpointManager(str(run / "checkpoints"))
    saved = {}
    for step in (1, 2):  # step 2's weights are step 1's + 1
        saved[step] = {name: p.asnumpy() for name, p in params.items()}
        manager.save(step, {"model": params, "ema": params}, {"config": cfg, "step": step})
        for p in params.values():
            p.set_data(Tensor(p.asnumpy() + 1))
    for path in (run, run / "checkpoints"):
        model, sched, cfg2 = load(str(path))[:3]
        assert cfg2 == cfg and sched.num_timesteps == 10
        loaded = {name: p.asnumpy() for name, p in ckpt.named_params(model).items()}
        assert all(np.array_equal(loaded[n], saved[2][n]) for n in saved[2])
        assert not any(np.array_equal(loaded[n], saved[1][n]) for n in saved[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints"):
        load(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist; pass a .ckpt file or a run directory"):
        load(str(tmp_path / "missing"))
