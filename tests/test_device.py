"""Backend choice: the loud fallback in one process, an error on every rank under msrun."""

import pytest

from ddpm_ms.utils import device
from ddpm_ms.utils.device import pick_backend, unavailable_reason
from ddpm_ms.utils.errors import UserError


def only(*names):
    return lambda name: name in names


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """These tests decide as a single process unless they set MS_WORKER_NUM themselves."""
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)


@pytest.mark.parametrize("requested, available, expected", [
    ("auto", ("CPU",), "CPU"),
    ("auto", ("GPU", "CPU"), "GPU"),
    ("auto", ("Ascend", "GPU", "CPU"), "Ascend"),
    ("Ascend", ("Ascend", "CPU"), "Ascend"),
    ("CPU", ("Ascend", "CPU"), "CPU"),
])
def test_available_backends_are_used_silently(requested, available, expected):
    assert pick_backend(requested, only(*available)) == (expected, None)


@pytest.mark.parametrize("requested, available, expected", [
    ("Ascend", ("CPU",), "CPU"),
    ("Ascend", ("GPU", "CPU"), "GPU"),
    ("GPU", ("CPU",), "CPU"),
])
def test_missing_backend_falls_back_with_a_warning_naming_the_backend_used(requested, available, expected):
    backend, warning = pick_backend(requested, only(*available))
    assert backend == expected
    assert f"device {requested} requested" in warning and f"falling back to {expected}" in warning


def test_this_machine_falls_back_from_ascend_to_cpu():
    # no NPU/GPU on the machines this runs on; on a machine with an NPU this is simply skipped
    backend, warning = pick_backend("Ascend")
    if backend == "Ascend":
        pytest.skip("an Ascend NPU is available here")
    assert warning and backend in ("GPU", "CPU")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="unknown device"):
        pick_backend("TPU")


def test_fallback_warning_names_why_the_backend_is_missing():
    def loader(missing):
        def load(lib):
            if lib == missing:
                raise OSError(f"{lib}: cannot open shared object file")
        return load

    reason = unavailable_reason("GPU", load=loader("libcudart.so.11.0"))
    assert reason.startswith("no CUDA 11.x runtime: libcudart.so.11.0 not found")
    assert "CUDA 11.1 or 11.6 with cuDNN 8" in reason
    assert "no cuDNN 8: libcudnn.so.8" in unavailable_reason("GPU", load=loader("libcudnn.so.8"))
    assert "libascendcl.so not found" in unavailable_reason("Ascend", load=loader("libascendcl.so"))
    assert "GLOG_v=1" in unavailable_reason("GPU", load=lambda lib: None)  # libraries fine, plugin not
    _, warning = pick_backend("GPU", only("CPU"))
    assert f"({unavailable_reason('GPU')})" in warning


def test_set_device_on_a_running_runtime_accepts_the_same_device_only(monkeypatch):
    import mindspore as ms

    from ddpm_ms.utils import device

    def already_running(target, device_id=None):
        raise RuntimeError("The 'mindspore.set_device' can not be modified.")

    monkeypatch.setattr(ms, "set_device", already_running)
    monkeypatch.setattr(ms, "get_current_device", lambda: ms.device_manager.DeviceInfo("Ascend", 0))
    device._set_device("Ascend", 0)  # the runtime this process already runs: fine
    device._set_device("Ascend", None)
    with pytest.raises(RuntimeError, match="already runs on Ascend device 0 .* cannot switch to Ascend device 1"):
        device._set_device("Ascend", 1)
    with pytest.raises(RuntimeError, match="cannot switch to GPU device 0"):
        device._set_device("GPU", 0)


@pytest.mark.parametrize("requested, available", [
    ("Ascend", ("CPU",)),
    ("Ascend", ("GPU", "CPU")),  # not even to another accelerator
    ("GPU", ("Ascend", "CPU")),
])
@pytest.mark.parametrize("role", ["MS_WORKER", "MS_SCHED"])
def test_under_msrun_a_missing_device_is_an_error_not_a_fallback(monkeypatch, requested, available, role):
    # msrun sets MS_WORKER_NUM in its workers and in its scheduler (which runs the same command)
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    monkeypatch.setenv("MS_ROLE", role)
    with pytest.raises(UserError) as info:
        pick_backend(requested, only(*available))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"device {requested} requested but ")
    assert f"({unavailable_reason(requested)})" in message
    assert "MS_WORKER_NUM=2" in message and message.endswith("or pass --device CPU")
    assert ("source CANN's set_env.sh" in message) == (requested == "Ascend")
    assert ("CUDA and cuDNN libraries loadable" in message) == (requested == "GPU")


@pytest.mark.parametrize("workers", [None, "1", "not a number"])
def test_one_process_still_falls_back(monkeypatch, workers):
    if workers is not None:
        monkeypatch.setenv("MS_WORKER_NUM", workers)
    backend, warning = pick_backend("GPU", only("CPU"))
    assert backend == "CPU" and "falling back to CPU" in warning


def test_under_msrun_available_and_auto_devices_are_unchanged(monkeypatch):
    monkeypatch.setenv("MS_WORKER_NUM", "8")
    assert pick_backend("Ascend", only("Ascend", "CPU")) == ("Ascend", None)
    assert pick_backend("CPU", only("CPU")) == ("CPU", None)
    assert pick_backend("auto", only("CPU")) == ("CPU", None)
    assert pick_backend("GPU", only("CPU"), workers=1)[0] == "CPU"  # an explicit count wins over the environment


def test_setup_device_under_msrun_raises_before_touching_the_runtime(monkeypatch):
    import mindspore as ms

    if device.backend_available("GPU"):
        pytest.skip("a GPU is available here")
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    monkeypatch.setattr(ms, "set_device", lambda *a: pytest.fail("set_device called"))
    with pytest.raises(UserError, match="device GPU requested"):
        device.setup_device("GPU")


def test_backend_availability_uses_device_context(monkeypatch):
    # mindspore.device_context.<device>.is_available(), not the deprecated mindspore.hal.is_available
    import mindspore as ms

    monkeypatch.setattr(ms.hal, "is_available", lambda *a: pytest.fail("deprecated ms.hal.is_available called"))
    for name in ("Ascend", "GPU", "CPU"):
        assert device.backend_available(name) == getattr(ms.device_context, name.lower()).is_available()
    assert device.backend_available("CPU")
    assert not device.backend_available("TPU")  # no such module: absent, not an exception
