"""Backend choice and the loud fallback."""

import pytest

from ddpm_ms.device import pick_backend


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
