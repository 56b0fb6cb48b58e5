"""Stat stamps of many files: in this thread, in threads (stats that wait on a disk) and halved with a forked
copy of the process (stats from the kernel's cache), each the same stamps in the same order; a fork or a child
that fails leaves the stats to this process."""

import os
import time

import numpy as np
import pytest

from leakpipe.pipeline.store import stats
from tests.test_hashing import files


@pytest.fixture
def paths(tmp_path):
    out = [str(p) for p in files(tmp_path / "a", 20)]
    out.insert(7, str(tmp_path / "gone.png"))  # cannot be stat'ed: zeros, not seen
    out.insert(17, str(tmp_path / "gone too.png"))  # in the second half, which the child stats
    return out


def serial(paths):
    return stats._stamps(stats._stat_all(paths))


def same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert not got[1][[7, 17]].any() and got[1].sum() == 20 and (got[0][[7, 17]] == 0).all()


@pytest.fixture
def forks(monkeypatch):
    """A probe and parts of 3 files and a fork for anything longer, allowed on any machine; counts the forks."""
    made = []
    real = os.fork

    def fork():
        made.append(1)
        return real()

    monkeypatch.setattr(stats, "STAT_PART", 3)
    monkeypatch.setattr(stats, "PROBE", 3)
    monkeypatch.setattr(stats, "FORK_MIN", 2)
    monkeypatch.setattr(stats, "_can_fork", lambda: True)
    monkeypatch.setattr(os, "fork", fork)
    return made


def test_stats_in_threads_are_the_stats_in_order(paths, forks):
    want = serial(paths)
    same(stats.stat_stamps(paths, 0.0), want)  # every stat "slow": the parts after the first in threads
    assert forks == []


def test_stats_halved_with_a_forked_copy_are_the_stats_in_order(paths, forks, monkeypatch):
    want, parent, real, here = serial(paths), os.getpid(), stats._stat_all, []

    def counted(part):
        if os.getpid() == parent:
            here.append(len(part))
        return real(part)

    monkeypatch.setattr(stats, "_stat_all", counted)
    same(stats.stat_stamps(paths, 1.0), want)  # every stat "fast": the rest halved with a child
    # the child's half reached this process through the shared memory, not by stat'ing it here
    assert forks == [1] and sum(here) == 3 + (len(paths) - 3) // 2


def test_without_a_fork_the_stats_are_taken_here(paths, forks, monkeypatch):
    want = serial(paths)

    def refused():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    same(stats.stat_stamps(paths, 1.0), want)
    monkeypatch.setattr(stats, "_can_fork", lambda: False)  # one core, or not Linux
    same(stats.stat_stamps(paths, 1.0), want)


def test_a_child_that_fails_leaves_its_half_to_this_process(paths, forks, monkeypatch):
    want, parent, real = serial(paths), os.getpid(), stats._stat_all

    def failing_in_the_child(part):
        if os.getpid() != parent:
            raise MemoryError("in the child")
        return real(part)

    monkeypatch.setattr(stats, "_stat_all", failing_in_the_child)
    same(stats.stat_stamps(paths, 1.0), want)
    assert forks == [1]


def joined(paths, root):
    """The paths as a lock's side file holds them: names under `root`, "\\0"-separated bytes."""
    names = [os.path.relpath(p, root) for p in paths]
    return stats.Joined(os.fsencode(f"{root}/"), "\0".join(names).encode(), len(names))


def test_a_side_files_names_are_cut_into_the_same_paths_wherever_they_are_cut(paths, tmp_path):
    names, want = joined(paths, tmp_path), [os.fsencode(p) for p in paths]
    n = len(want)
    assert names.paths() == want and stats.Joined(b"/x/", b"", 0).paths() == []
    for k in (0, 1, 7, n - 1, n, n + 5):
        head, rest = names.cut(k)
        assert (head.paths(), rest.paths(), len(head), len(rest)) == (want[:k], want[k:], min(k, n), max(n - k, 0))
    first, second = names.halves()
    assert first.paths() + second.paths() == want and len(first) + len(second) == n
    assert abs(len(first) - len(second)) <= 2  # names of about one length: about half the rows each


def test_a_side_files_names_give_the_stamps_of_the_paths_in_threads_and_forked(paths, tmp_path, forks):
    want = serial(paths)
    same(stats.stat_stamps(joined(paths, tmp_path), 0.0), want)
    assert forks == []
    same(stats.stat_stamps(joined(paths, tmp_path), 1.0), want)  # each process cuts the half it stats
    assert forks == [1]


def test_the_probe_times_the_stats_not_the_cutting_of_a_long_list(paths, tmp_path, forks, monkeypatch):
    """A million names take tens of milliseconds to cut off the probe: that is not the stats' speed, and
    must not send stats from the kernel's cache to threads."""
    real = stats.Joined.cut

    def slow_cut(self, k):
        time.sleep(0.1)  # 33 ms a probed file, were it counted
        return real(self, k)

    monkeypatch.setattr(stats.Joined, "cut", slow_cut)
    same(stats.stat_stamps(joined(paths, tmp_path), 1e-3), serial(paths))  # a local stat: far below 1 ms
    assert forks == [1]


def test_an_interrupt_while_the_child_stats_kills_and_reaps_it(paths, forks, monkeypatch):
    parent, real, children = os.getpid(), stats._stamp_into, []
    fork = os.fork

    def recorded():
        pid = fork()
        children.append(pid)
        return pid

    def interrupted(part, stamps, seen):
        if os.getpid() != parent:
            time.sleep(60)  # the child, still at work
        elif len(part) > 3:  # this process's half (not the probe)
            raise KeyboardInterrupt
        return real(part, stamps, seen)

    monkeypatch.setattr(os, "fork", recorded)
    monkeypatch.setattr(stats, "_stamp_into", interrupted)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        stats.stat_stamps(paths, 1.0)
    assert len(children) == 1 and time.perf_counter() - start < 30
    with pytest.raises(ProcessLookupError):  # killed and reaped: no such process, not even a zombie
        os.kill(children[0], 0)
