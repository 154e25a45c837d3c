"""The suite's pytest-xdist scheduling (tests/conftest.py): under ``--dist load`` the tests of each module with
a costly module fixture (``ONE_WORKER_MODULES``) run on one worker, so the fixture is computed once; every
other test is scheduled on its own, spread over the workers as they free up; another ``--dist`` is xdist's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("xdist")
import conftest  # noqa: E402  (tests/conftest.py, on sys.path as pytest's rootdir conftest)


class _Node:
    """What the scheduler asks of a worker: the indices it sends, and shutdown."""

    def __init__(self, name: str) -> None:
        self.name, self.pending, self.ran, self.shutting_down = name, [], [], False
        self.gateway = SimpleNamespace(id=name)

    def send_runtest_some(self, indices: list[int]) -> None:
        self.pending.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def _config(dist: str) -> SimpleNamespace:
    options = {"dist": dist, "tx": ["2*popen"], "loadscopereorder": True}
    return SimpleNamespace(getoption=options.__getitem__, getvalue=options.__getitem__,
                           option=SimpleNamespace(**options))  # fmt: skip


def _run(scheduler, collection: list[str]) -> dict[str, str]:
    """Drive ``scheduler`` over two workers that each finish one test a turn; ``{test: worker}``."""
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        scheduler.add_node(node)
    for node in nodes:
        scheduler.add_node_collection(node, collection)
    scheduler.schedule()
    while any(node.pending for node in nodes):
        for node in nodes:
            if node.pending:
                index = node.pending.pop(0)
                node.ran.append(collection[index])
                scheduler.mark_test_complete(node, index)
    return {test: node.name for node in nodes for test in node.ran}


def test_a_costly_fixtures_module_runs_on_one_worker_and_the_rest_spreads() -> None:
    costly = conftest.ONE_WORKER_MODULES[0]
    collection = [f"tests/a/test_one.py::test_{i}" for i in range(6)]
    collection += [f"{costly}::test_{i}" for i in range(5)]
    collection += [f"tests/b/test_two.py::test_{i}" for i in range(6)]
    ran_on = _run(conftest.pytest_xdist_make_scheduler(_config("load"), None), collection)
    assert sorted(ran_on) == sorted(collection)  # each test once
    assert len({ran_on[t] for t in collection if t.startswith(costly)}) == 1
    for module in ("tests/a/test_one.py", "tests/b/test_two.py"):  # not kept whole: both workers take some
        assert len({ran_on[t] for t in collection if t.startswith(module)}) == 2, module


@pytest.mark.parametrize("dist", ["loadfile", "loadscope", "worksteal", "loadgroup"])
def test_any_other_dist_is_left_to_xdist(dist) -> None:
    assert conftest.pytest_xdist_make_scheduler(_config(dist), None) is None
