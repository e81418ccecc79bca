"""ddpm_ms.utils.cache: one rule for the kernel, classifier and dataset caches, and every user of it follows it."""

import os

import pytest

from ddpm_ms.utils import cache
from ddpm_ms.evaluation import classifier
from ddpm_ms.data import mnist
from ddpm_ms.models import kernels
from ddpm_ms.data import cifar10

VARIABLES = ("XDG_CACHE_HOME", "DDPM_MS_KERNEL_CACHE", "DDPM_MS_CACHE", "DDPM_MS_DATA")


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_default_root_is_home_cache_then_xdg(env, tmp_path):
    home = tmp_path / "home" / ".cache" / "ddpm_ms"
    for kind in ("kernels", "classifier", "fashion-mnist", "mnist", "cifar-10"):
        assert cache.cache_dir(kind) == str(home / kind)
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir("mnist") == str(tmp_path / "xdg" / "ddpm_ms" / "mnist")


def test_each_variable_moves_only_its_own_cache(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("DDPM_MS_KERNEL_CACHE", str(tmp_path / "k"))
    env.setenv("DDPM_MS_CACHE", str(tmp_path / "c"))
    env.setenv("DDPM_MS_DATA", str(tmp_path / "d"))
    assert cache.cache_dir("kernels") == str(tmp_path / "k")  # names the directory itself
    assert cache.cache_dir("classifier") == str(tmp_path / "c" / "classifier")  # names a root
    assert cache.cache_dir("fashion-mnist") == str(tmp_path / "d")
    assert cache.cache_dir("mnist") == str(tmp_path / "xdg" / "ddpm_ms" / "mnist")
    assert cache.cache_dir("cifar-10") == str(tmp_path / "xdg" / "ddpm_ms" / "cifar-10")


def test_relative_and_home_relative_values_become_absolute(env, tmp_path):
    env.chdir(tmp_path)
    env.setenv("DDPM_MS_KERNEL_CACHE", "rel")
    env.setenv("DDPM_MS_CACHE", "~/c")
    assert cache.cache_dir("kernels") == str(tmp_path / "rel")
    assert cache.cache_dir("classifier") == str(tmp_path / "home" / "c" / "classifier")


def test_the_three_users_ask_the_helper(env, tmp_path):
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("DDPM_MS_KERNEL_CACHE", str(tmp_path / "k"))
    env.setenv("DDPM_MS_CACHE", str(tmp_path / "c"))
    assert kernels.cache_dir() == str(tmp_path / "k")
    assert classifier.default_cache_dir() == str(tmp_path / "c" / "classifier")
    assert mnist.default_cache_dir("mnist") == str(tmp_path / "xdg" / "ddpm_ms" / "mnist")
    assert cifar10.default_cache_dir() == str(tmp_path / "xdg" / "ddpm_ms" / "cifar-10")
    assert os.path.dirname(kernels.library_path(kernels._compiler() or "g++")) == str(tmp_path / "k")
