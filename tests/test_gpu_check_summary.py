"""bench/gpu_check_summary.py: the parts line of a run limited by GPU_CHECK_PARTS."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import gpu_check_summary  # noqa: E402


def test_parts_left_out_by_gpu_check_parts_are_listed_apart(tmp_path, capsys):
    """Parts run keep their status and times; the parts GPU_CHECK_PARTS left out are named
    once at the end, not as eleven "not selected 0/0s" entries among them."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "parts.tsv").write_text(
        "part\tbudget_s\tused_s\tstatus\n"
        "a\t0\t0\tnot selected (GPU_CHECK_PARTS)\n"
        "t\t150\t150\tTIMEOUT\n"
        "c2\t0\t0\tnot selected (GPU_CHECK_PARTS)\n"
        "d\t300\t95\tok\n")
    gpu_check_summary.main(["--work", str(work), "--out", str(out)])
    parts = next(line for line in (out / "summary.txt").read_text().splitlines() if line.strip().startswith("parts:"))
    assert parts.strip() == "parts: t TIMEOUT 150/150s | d ok 95/300s | not selected (GPU_CHECK_PARTS): a c2"


def test_kernel_tests_cut_short_are_counted_in_either_pytest_format(tmp_path):
    """Part t's log, cut at its budget: per-test lines of one process ("path::name PASSED")
    and of pytest-xdist workers ("[gw1] [ 5%] FAILED path::name") are both counted by
    file and outcome, a failure is named, and a test's start line (no outcome) is not counted."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "t").mkdir(parents=True)
    (work / "t" / "log.txt").write_text(
        "tests/test_a.py::test_one PASSED [  1%]\n"
        "tests/test_b.py::test_two[x] \n"
        "[gw1] [  2%] FAILED tests/test_b.py::test_two[x] \n"
        "[gw0] [  3%] PASSED tests/test_b.py::test_three \n"
        "tests/test_b.py::test_four \n")
    gpu_check_summary.main(["--work", str(work), "--out", str(out)])
    text = (out / "summary.txt").read_text()
    assert "cut short after 3 tests: test_a.py: 1 passed; test_b.py: 1 failed, 1 passed" in text
    assert "  FAILED test_b.py::test_two[x]" in text


def test_the_phase_split_is_copied_from_part_f_log(tmp_path):
    """Part f's indented result lines (the split by primitive) reach the summary; its
    headers ("== phases ...", "# ...") do not."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "f").mkdir(parents=True)
    (work / "f" / "log.txt").write_text(
        "# gpu_profile on NVIDIA H200\n== phases (at 0s, until 25s)\n"
        "  swav 3000x4096 dense, 3 iterations: wall 2.70 ms; with each primitive synchronised 3.10 ms\n"
        "          0.501 ms in     2 x sinkhorn_steps\n")
    gpu_check_summary.main(["--work", str(work), "--out", str(out)])
    lines = (out / "summary.txt").read_text().splitlines()
    at = lines.index("[f] where the time goes, by primitive (each call synchronised) and per launch (cProfile)")
    assert lines[at + 1:at + 3] == ["  swav 3000x4096 dense, 3 iterations: wall 2.70 ms; with each primitive "
                                    "synchronised 3.10 ms", "          0.501 ms in     2 x sinkhorn_steps"]
    assert not any(ln.startswith("== phases") for ln in lines)
