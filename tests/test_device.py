"""Backend choice and the loud fallback."""

import pytest

from ddpm_ms.device import pick_backend, unavailable_reason


def only(*names):
    return lambda name: name in names


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

    from ddpm_ms import device

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
