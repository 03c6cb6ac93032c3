import pytest

from tests.harness import leftover_service_processes


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    left = leftover_service_processes()
    assert not left, f"service processes left running: {left}"
