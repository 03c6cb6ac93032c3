import pytest

from tests.e2e.harness import leftover_service_processes


@pytest.fixture(autouse=True, scope="module")
def no_process_left_behind():
    before = set(leftover_service_processes())
    yield
    left = [p for p in leftover_service_processes() if p not in before]
    assert not left, f"service processes left running: {left}"
