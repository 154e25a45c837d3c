"""The suite's pytest-xdist scheduling (tests/conftest.py): under ``--dist load`` the tests of each module with
a costly module fixture (``ONE_WORKER_MODULES``) run on one worker, so the fixture is computed once; every
other test is scheduled on its own, spread over the workers as they free up; a test that crashed its worker is
not run again; another ``--dist`` is xdist's."""

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


def _run(scheduler, collection: list[str], crash: str | None = None) -> dict[str, list[str]]:
    """Drive ``scheduler`` over two workers that each finish one test a turn; a worker that starts ``crash``
    goes down (and is replaced, as xdist does). ``{test: [workers that ran it]}``."""
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        scheduler.add_node(node)
    for node in nodes:
        scheduler.add_node_collection(node, collection)
    scheduler.schedule()
    ran: dict[str, list[str]] = {}
    while any(node.pending for node in nodes):
        for i, node in enumerate(nodes):
            if not node.pending:
                continue
            test = collection[node.pending[0]]
            ran.setdefault(test, []).append(node.name)
            if test == crash:
                assert scheduler.remove_node(node) == crash
                nodes[i] = _Node(f"{node.name}-replaced")
                scheduler.add_node(nodes[i])
                scheduler.add_node_collection(nodes[i], collection)
                scheduler.schedule()
                continue
            scheduler.mark_test_complete(node, node.pending.pop(0))
    return ran


def test_a_costly_fixtures_module_runs_on_one_worker_and_the_rest_spreads() -> None:
    costly = conftest.ONE_WORKER_MODULES[0]
    collection = [f"tests/a/test_one.py::test_{i}" for i in range(6)]
    collection += [f"{costly}::test_{i}" for i in range(5)]
    collection += [f"tests/b/test_two.py::test_{i}" for i in range(6)]
    ran = _run(conftest.pytest_xdist_make_scheduler(_config("load"), None), collection)
    assert sorted(ran) == sorted(collection) and all(len(w) == 1 for w in ran.values())  # each test once
    assert len({ran[t][0] for t in collection if t.startswith(costly)}) == 1
    for module in ("tests/a/test_one.py", "tests/b/test_two.py"):  # not kept whole: both workers take some
        assert len({ran[t][0] for t in collection if t.startswith(module)}) == 2, module


@pytest.mark.parametrize("crash", ["tests/a/test_one.py::test_3", f"{conftest.ONE_WORKER_MODULES[0]}::test_1"])
def test_a_test_that_crashes_its_worker_is_not_run_again(crash) -> None:
    collection = [f"tests/a/test_one.py::test_{i}" for i in range(6)]
    collection += [f"{conftest.ONE_WORKER_MODULES[0]}::test_{i}" for i in range(4)]
    ran = _run(conftest.pytest_xdist_make_scheduler(_config("load"), None), collection, crash=crash)
    assert sorted(ran) == sorted(collection)  # the rest of the crashed worker's tests ran elsewhere
    assert all(len(w) == 1 for w in ran.values()), ran


@pytest.mark.parametrize("dist", ["loadfile", "loadscope", "worksteal", "loadgroup"])
def test_any_other_dist_is_left_to_xdist(dist) -> None:
    assert conftest.pytest_xdist_make_scheduler(_config(dist), None) is None


def test_the_longest_modules_are_collected_first_each_in_its_own_order() -> None:
    first, second = conftest.RUN_FIRST[0], conftest.RUN_FIRST[-1]
    ids = ["tests/a.py::t1", f"{second}::x", "tests/b.py::t2", f"{first}::y", f"{second}::z", "tests/c.py::t3"]
    items = [SimpleNamespace(nodeid=nodeid) for nodeid in ids]
    conftest.pytest_collection_modifyitems(None, items)
    assert [item.nodeid for item in items] == [
        f"{first}::y", f"{second}::x", f"{second}::z", "tests/a.py::t1", "tests/b.py::t2", "tests/c.py::t3",
    ]  # fmt: skip
