"""The command line: ``otcore solve``, ``otcore demo`` and ``python -m otcore``.

Most tests call :func:`otcore.cli.main` in-process (no interpreter start-up); three
run the real entry point in a subprocess to check exit statuses and that stdout
carries nothing but the JSON object.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import otcore
from otcore import cli
from otcore.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_json(capsys, *flags: str) -> dict:
    """``otcore solve --json FLAGS`` in-process; the parsed summary. Nothing on stderr
    (no progress line when not on a terminal)."""
    assert main(["solve", "--json", "--device", "cpu", *flags]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def save_clouds(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> tuple[str, str]:
    xp, yp = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(xp, x)
    np.save(yp, y)
    return str(xp), str(yp)


@pytest.fixture
def clouds(tmp_path):
    """Two float64 clouds, n=40, m=30, d=3, saved as .npy; returns (x, y, xpath, ypath)."""
    rng = np.random.default_rng(7)
    x, y = rng.random((40, 3)), rng.random((30, 3)) * 0.8 + 0.1
    return (x, y, *save_clouds(tmp_path, x, y))


# --------------------------------------------------------------------------- solve
def test_solve_random_json(capsys):
    # float64: in float32 the recomputed marginal error may sit a rounding step above tol
    tol = 1e-6
    s = run_json(capsys, "--n", "60", "--m", "45", "--d", "2", "--eps", "0.05", "--tol", str(tol), "--dtype", "float64")
    assert (s["method"], s["n"], s["m"], s["d"], s["batch"]) == ("sinkhorn", 60, 45, 2, None)
    assert (s["cost_fn"], s["eps"], s["rho"], s["dtype"], s["device"], s["backend"]) == (
        "sqeuclidean", 0.05, None, "float64", "cpu", "torch"
    )
    assert s["converged"] is True and 0 < s["n_iter"] <= 1000
    assert s["marginal_error"] <= tol
    # balanced: value = <P, C> + eps KL(P | a x b) with KL >= 0, and C >= 0
    assert 0 < s["cost"] <= s["value"]


def test_solve_cuda_graph_flag_reaches_the_solver(capsys, monkeypatch):
    import otcore.cli as cli

    seen = {}
    real = cli.sinkhorn

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(cli, "sinkhorn", spy)
    s = run_json(capsys, "--n", "30", "--eps", "0.1", "--cuda-graph")
    assert seen["cuda_graph"] is True and s["converged"] is True  # on CPU tensors: same solve, no graphs
    run_json(capsys, "--n", "30", "--eps", "0.1")
    assert seen["cuda_graph"] is False


def test_dtype_changes_the_precision_not_the_random_points(capsys, monkeypatch):
    """The random clouds are drawn in float64 and cast to ``--dtype`` (a review: the same
    ``--seed`` drew other points in float32, values 18-24% apart)."""
    import otcore.cli as cli

    seen = {}
    real = cli.sinkhorn

    def spy(geom, *args, **kw):
        seen[geom.dtype] = (geom.x_in, geom.y_in)
        return real(geom, *args, **kw)

    monkeypatch.setattr(cli, "sinkhorn", spy)
    runs = {dt: run_json(capsys, "--n", "40", "--m", "30", "--eps", "0.05", "--dtype", dt) for dt in ("float32", "float64")}
    x32, y32 = seen[torch.float32]
    x64, y64 = seen[torch.float64]
    assert x32.dtype == torch.float32 and torch.equal(x32, x64.float()) and torch.equal(y32, y64.float())
    torch.testing.assert_close(x64, _random_cloud(0, (40, 3), 0.0, 1.0), rtol=0, atol=0)
    assert runs["float32"]["value"] == pytest.approx(runs["float64"]["value"], rel=1e-4)


def test_solve_overrelax_flag_reaches_the_solver(capsys, monkeypatch):
    """``--overrelax auto|on|off|factor`` (sinkhorn): the solver's ``overrelax``; auto
    (the solver's default) when absent; plain iterations take more of them here."""
    import otcore.cli as cli

    seen = []
    real = cli.sinkhorn

    def spy(*args, **kw):
        seen.append(kw["overrelax"])
        return real(*args, **kw)

    monkeypatch.setattr(cli, "sinkhorn", spy)
    base = ["--n", "80", "--eps", "0.01", "--dtype", "float64"]
    runs = {flag: run_json(capsys, *base, *(["--overrelax", flag] if flag else [])) for flag in ("", "off", "on", "1.5")}
    assert seen == ["auto", False, True, 1.5]
    assert all(s["converged"] for s in runs.values())
    assert runs[""]["n_iter"] == runs["on"]["n_iter"] < runs["off"]["n_iter"]
    with pytest.raises(SystemExit, match="--overrelax as a factor must be in"):
        main(["solve", *base, "--overrelax", "2.5", "--quiet"])
    with pytest.raises(SystemExit, match="--overrelax does not apply to --method sparse"):
        main(["solve", "--n", "80", "--method", "sparse", "--k", "4", "--gamma", "1", "--overrelax", "on", "--quiet"])


def test_solve_newton_overrelax_flag_is_the_warmup_factor(capsys, monkeypatch):
    """``--method newton --overrelax``: the warm-up's factor (``warmup_overrelax``), the
    solver's default (1.8) when absent; a bad factor names the flag."""
    import otcore.cli as cli

    seen = []
    real = cli.sinkhorn_newton

    def spy(*args, **kw):
        seen.append(kw.get("warmup_overrelax", "default"))
        return real(*args, **kw)

    monkeypatch.setattr(cli, "sinkhorn_newton", spy)
    base = ["--method", "newton", "--n", "60", "--eps", "0.01", "--dtype", "float64"]
    runs = [run_json(capsys, *base, *(["--overrelax", flag] if flag else [])) for flag in ("", "off", "1.5")]
    assert seen == ["default", False, 1.5] and all(r["converged"] for r in runs)
    with pytest.raises(SystemExit, match=r"^error: --overrelax as a factor must be in \(0, 2\)"):
        main(["solve", *base, "--overrelax", "2.5", "--quiet"])
    with pytest.raises(SystemExit, match=r"^error: --overrelax must be a fixed factor in \(0, 2\) or False \(off\)"):
        main(["solve", *base, "--overrelax", "auto", "--quiet"])


def test_an_overrelax_that_is_no_setting_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["solve", "--overrelax", "fast"])
    assert exc.value.code == 2 and "--overrelax: must be auto, on, off or a factor" in capsys.readouterr().err


def test_solve_from_npy_matches_library_and_pot(capsys, clouds):
    import ot

    x, y, xp, yp = clouds
    eps, tol = 0.1, 1e-8
    s = run_json(capsys, "--x", xp, "--y", yp, "--eps", str(eps), "--tol", str(tol), "--dtype", "float64")
    assert (s["n"], s["m"], s["d"]) == (40, 30, 3)
    assert s["converged"] is True and s["marginal_error"] <= tol

    direct = otcore.sinkhorn(otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y)), eps=eps, tol=tol)
    assert s["n_iter"] == direct.n_iter
    assert s["value"] == pytest.approx(float(direct.value), rel=1e-12)
    assert s["cost"] == pytest.approx(float(direct.cost), rel=1e-12)

    # independent reference: POT's log-domain Sinkhorn, same cost (no 1/2) and reg = eps
    a, b = np.full(40, 1 / 40), np.full(30, 1 / 30)
    P = ot.sinkhorn(a, b, ot.dist(x, y), eps, method="sinkhorn_log", stopThr=1e-12, numItermax=10_000)
    assert s["cost"] == pytest.approx(float((P * ot.dist(x, y)).sum()), rel=1e-6)


def test_solve_batched_npy(capsys, tmp_path):
    rng = np.random.default_rng(1)
    xp, yp = save_clouds(tmp_path, rng.random((2, 20, 2)), rng.random((2, 15, 2)))
    s = run_json(capsys, "--x", xp, "--y", yp, "--eps", "0.1", "--tol", "1e-6", "--dtype", "float64")
    assert s["batch"] == 2 and (s["n"], s["m"], s["d"]) == (20, 15, 2)
    for key in ("n_iter", "converged", "marginal_error", "cost", "value"):
        assert isinstance(s[key], list) and len(s[key]) == 2, key
    assert s["converged"] == [True, True]
    assert max(s["marginal_error"]) <= 1e-6


def _random_cloud(seed: int, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    """The cloud ``otcore solve`` draws for a side without a file (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("file_side", ["--x", "--y"])
def test_solve_random_side_takes_d_from_the_file(capsys, tmp_path, file_side):
    pts = np.random.default_rng(2).random((25, 2))  # d = 2, not the default 3
    path = _save(tmp_path / "pts.npy", pts)
    s = run_json(capsys, file_side, str(path), "--n", "15", "--eps", "0.1", "--tol", "1e-9", "--dtype", "float64")
    assert s["d"] == 2 and s["batch"] is None and s["converged"] is True
    if file_side == "--x":  # the random target takes --n's size (documented: --m defaults to --n's value)
        x, y = torch.from_numpy(pts), _random_cloud(0, (15, 2), 0.05, 0.95)
    else:
        x, y = _random_cloud(0, (15, 2), 0.0, 1.0), torch.from_numpy(pts)
    assert (s["n"], s["m"]) == (x.shape[0], y.shape[0])
    direct = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, tol=1e-9)
    assert s["value"] == pytest.approx(float(direct.value), rel=1e-12)
    # a --d that agrees with the file changes nothing
    again = run_json(capsys, file_side, str(path), "--n", "15", "--eps", "0.1", "--tol", "1e-9", "--dtype", "float64",
                     "--d", "2")
    assert again["value"] == s["value"]


@pytest.mark.parametrize("file_side", ["--x", "--y"])
def test_solve_random_side_takes_batch_from_the_file(capsys, tmp_path, file_side):
    pts = np.random.default_rng(4).random((3, 20, 4))  # B = 3, d = 4
    path = _save(tmp_path / "pts.npy", pts)
    s = run_json(capsys, file_side, str(path), "--n", "12", "--m", "9", "--eps", "0.2", "--tol", "1e-9",
                 "--dtype", "float64")
    assert (s["batch"], s["d"]) == (3, 4) and s["converged"] == [True] * 3
    if file_side == "--x":
        x, y = torch.from_numpy(pts), _random_cloud(0, (3, 9, 4), 0.05, 0.95)
    else:
        x, y = _random_cloud(0, (3, 12, 4), 0.0, 1.0), torch.from_numpy(pts)
    assert (s["n"], s["m"]) == (x.shape[1], y.shape[1])
    direct = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.2, tol=1e-9)
    assert s["value"] == pytest.approx(direct.value.tolist(), rel=1e-12)


def test_sizes_beyond_memory_or_int64_name_their_flag():
    for argv, flag in ((["--n", "20", "--m", str(10**20)], "--m"), (["--n", str(10**20)], "--n"),
                       (["--n", "20", "--d", str(10**20)], "--n")):
        with pytest.raises(SystemExit, match=f"^error: cannot draw {flag} "):
            main(["solve", "--device", "cpu", "--quiet", *argv])


def test_a_schedule_that_is_no_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["solve", "--eps-schedule", "abc"])
    assert exc.value.code == 2 and "--eps-schedule: must be none, geometric or a decay factor" in capsys.readouterr().err


def test_sparse_summary_reports_the_k_solved_with(capsys):
    """A --k above the line length is capped by the solver; the summary says the k used."""
    s = run_json(capsys, "--method", "sparse", "--n", "12", "--m", "5", "--k", "500", "--gamma", "0.5")
    assert s["k"] == 12


def test_sparse_gamma_schedule_flag(capsys):
    """--gamma-schedule: auto (the default) runs the continuation where --k >= the column
    length and gamma is small; none turns it off; a factor sets it (any k); both reach the
    same optimum. A bad value is a usage error, a factor out of (0, 1) the solver's."""
    argv = ("--method", "sparse", "--n", "20", "--m", "15", "--k", "20", "--gamma", "1e-4", "--dtype", "float64",
            "--tol", "1e-8")
    auto = run_json(capsys, *argv)
    none = run_json(capsys, *argv, "--gamma-schedule", "none")
    half = run_json(capsys, *argv, "--gamma-schedule", "0.5")
    assert len(auto["gamma_stages"]) > 0 and none["gamma_stages"] == []
    assert len(half["gamma_stages"]) > len(auto["gamma_stages"])
    assert auto["converged"] and half["converged"]
    assert auto["value"] == pytest.approx(half["value"], rel=1e-9)
    assert none["value"] == pytest.approx(auto["value"], rel=1e-6)  # (the flag's run may stop short: its own tol)
    with pytest.raises(SystemExit) as exc:
        main(["solve", *argv, "--gamma-schedule", "geometric"])
    assert exc.value.code == 2 and "--gamma-schedule: must be auto, none or a decay factor" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--gamma-schedule as a decay factor must be in"):
        main(["solve", "--quiet", *argv, "--gamma-schedule", "2"])


def test_sparse_relaxed_start_flag(capsys):
    """--relaxed-start: auto (the default) and on start from the optimum without --k (its Newton
    iterations reported), off from zero; a bad value is a usage error."""
    argv = ("--method", "sparse", "--n", "60", "--m", "60", "--k", "4", "--gamma", "10", "--dtype", "float64")
    auto, on, off = (run_json(capsys, *argv, *flag) for flag in ((), ("--relaxed-start", "on"),
                                                                ("--relaxed-start", "off")))
    assert auto["solver"] == on["solver"] == "newton (relaxed start), then L-BFGS" and auto == {**on, "time_s": auto["time_s"]}
    assert auto["relaxed_iter"] > 0 and off["solver"] == "L-BFGS" and off["relaxed_iter"] is None
    assert auto["value"] == pytest.approx(off["value"], rel=1e-3) and auto["max_nonzeros_per_column"] <= 4
    with pytest.raises(SystemExit) as exc:
        main(["solve", *argv, "--relaxed-start", "yes"])
    assert exc.value.code == 2 and "--relaxed-start: invalid choice" in capsys.readouterr().err


def test_solve_clouds_that_disagree_fail_before_solving(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "sinkhorn", lambda *a, **k: pytest.fail("solved despite mismatched clouds"))
    rng = np.random.default_rng(0)
    x2, y3 = _save(tmp_path / "x2.npy", rng.random((10, 2))), _save(tmp_path / "y3.npy", rng.random((8, 3)))
    xb3, yb2 = _save(tmp_path / "xb3.npy", rng.random((3, 10, 2))), _save(tmp_path / "yb2.npy", rng.random((2, 8, 2)))
    y2 = _save(tmp_path / "y2.npy", rng.random((8, 2)))
    cases = [
        (["--x", str(x2), "--y", str(y3)], f"--x {x2} (10, 2) and --y {y3} (8, 3) must have the same dimension d, got 2 and 3"),
        (["--x", str(xb3), "--y", str(yb2)], "must have the same batch size B, got 3 and 2"),
        (["--x", str(x2), "--y", str(yb2)], "must both be batched (B, n, d) or both not (n, d)"),
        (["--x", str(xb3), "--y", str(y2)], "must both be batched (B, n, d) or both not (n, d)"),
        (["--x", str(x2), "--d", "3"], f"--d 3 does not match --x {x2}, whose points have d = 2"),
        (["--y", str(y3), "--d", "2"], f"--d 2 does not match --y {y3}, whose points have d = 3"),
    ]
    for flags, message in cases:
        msg = _exit_message(["solve", "--device", "cpu", *flags])
        assert msg.startswith("error: ") and message in msg, (flags, msg)


def test_solve_backend_that_cannot_run_exits_with_message(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read when the backend is resolved
    monkeypatch.setattr(cli, "sinkhorn", lambda *a, **k: pytest.fail("solved with a backend that cannot run"))
    msg = _exit_message(["solve", "--n", "10", "--backend", "triton", "--device", "cpu"])
    assert msg.startswith("error: --backend triton on CPU tensors") and "TRITON_INTERPRET=1" in msg, msg
    assert "or use --backend torch" in msg and "backend='" not in msg  # the flag, not Python syntax


def test_solve_solver_errors_exit_with_message(monkeypatch):
    def solver(*args, **kw):
        raise ValueError("something the solver rejects")

    monkeypatch.setattr(cli, "sinkhorn", solver)
    assert _exit_message(["solve", "--n", "10", "--device", "cpu"]) == "error: something the solver rejects"


def test_solve_unbalanced_rho(capsys, clouds):
    x, y, xp, yp = clouds
    rho, eps = 0.5, 0.1
    s = run_json(capsys, "--x", xp, "--y", yp, "--eps", str(eps), "--rho", str(rho), "--tol", "1e-9", "--dtype", "float64")
    assert s["rho"] == rho and s["converged"] is True
    direct = otcore.sinkhorn(otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y)), eps=eps, rho=rho, tol=1e-9)
    assert s["value"] == pytest.approx(float(direct.value), rel=1e-12)
    balanced = otcore.sinkhorn(otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y)), eps=eps, tol=1e-9)
    # relaxing the marginals can only lower the optimum (the balanced plan is feasible, penalty 0)
    assert s["value"] < float(balanced.value)


def test_solve_method_newton(capsys, clouds):
    x, y, xp, yp = clouds
    geom = otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y))
    tol = 1e-8
    s = run_json(capsys, "--x", xp, "--y", yp, "--eps", "0.1", "--tol", str(tol), "--dtype", "float64", "--method", "newton")
    assert s["method"] == "newton" and s["converged"] is True and s["marginal_error"] <= tol
    reference = otcore.sinkhorn(geom, eps=0.1, tol=1e-10)
    assert s["value"] == pytest.approx(float(reference.value), rel=1e-6)


def test_solve_table_output(capsys):
    assert main(["solve", "--n", "30", "--eps", "0.1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in ("method", "n_iter", "converged", "marginal_error", "cost", "value", "time_s", "backend"):
        assert re.search(rf"^\s+{key}\s+\S", out, re.M), key


# --------------------------------------------------------------------------- bad input
def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    np.save(tmp_path / "flat.npy", np.zeros(5))
    x2, y3 = tmp_path / "x2.npy", tmp_path / "y3.npy"
    np.save(x2, np.random.default_rng(0).random((10, 2)))
    np.save(y3, np.random.default_rng(0).random((10, 3)))
    cases = [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["solve", "--method", "simplex"], "invalid choice"),
        (["solve", "--n", "abc"], "invalid int value"),
        (["solve", "--dtype", "float16"], "invalid choice"),
        (["solve", "--eps", "-1"], "--eps must be"),
        (["solve", "--n", "10", "--tol", "0"], "--tol must be"),
        (["solve", "--n", "10", "--rho", "-2"], "--rho must be"),
        (["solve", "--eps-schedule", "sometimes"], "--eps-schedule"),
        (["solve", "--x", str(tmp_path / "flat.npy")], "(n, d) or (B, n, d)"),
        (["solve", "--x", str(x2), "--y", str(y3)], "same dimension d"),
        (["demo", "--backend", "cupy"], "invalid choice"),
        (["demo", "--device", "tpu"], "invalid choice"),
        # sizes: 0 is not "the default"
        (["solve", "--n", "0"], "--n must be an integer >= 1, got 0"),
        (["solve", "--n", "-5"], "--n must be an integer >= 1, got -5"),
        (["solve", "--n", "10", "--m", "0"], "--m must be an integer >= 1, got 0"),
        (["solve", "--n", "10", "--d", "0"], "--d must be an integer >= 1, got 0"),
        (["solve", "--n", "10", "--check-every", "0"], "--check-every must be an integer >= 1"),
        # newton is balanced SNS: no unbalanced, no sinkhorn checks
        (["solve", "--n", "10", "--method", "newton", "--rho", "0.5"], "--rho does not apply to --method newton"),
        (["solve", "--n", "10", "--method", "newton", "--check-every", "5"], "--check-every does not apply to --method newton"),
        (["solve", "--n", "10", "--method", "newton", "--cuda-graph"], "--cuda-graph does not apply to --method newton"),
        (["solve", "--n", "10", "--method", "newton", "--warmup-iter", "-1"], "--warmup-iter must be an integer >= 0"),
        (["solve", "--n", "10", "--method", "newton", "--sparsity", "0"], "--sparsity must be an integer >= 1"),
        (["solve", "--n", "10", "--method", "newton", "--sparsity", "11"], "sparsity must be in [1, m=10]"),
        (["solve", "--n", "10", "--method", "newton", "--k", "2"], "--k does not apply to --method newton"),
        # SNS knobs and sparse flags are rejected with sinkhorn
        (["solve", "--n", "10", "--warmup-iter", "5"], "--warmup-iter does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--sparsity", "5"], "--sparsity does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--k", "2"], "--k does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--gamma", "0.1"], "--gamma does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--formulation", "dual"], "--formulation does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--axis", "1"], "--axis does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--gamma-schedule", "none"], "--gamma-schedule does not apply to --method sinkhorn"),
        (["solve", "--n", "10", "--relaxed-start", "off"], "--relaxed-start does not apply to --method sinkhorn"),
        # sparse: k and gamma required and valid; entropic flags rejected
        (["solve", "--n", "10", "--method", "sparse", "--gamma", "0.1"], "--method sparse needs --k"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2"], "--method sparse needs --gamma"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "0", "--gamma", "0.1"], "--k must be an integer >= 1, got 0"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0"], "--gamma must be a finite number > 0"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "nan"], "--gamma must be a finite number > 0"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--eps", "0.1"], "--eps does not apply to --method sparse"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--rho", "1"], "--rho does not apply to --method sparse"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--eps-schedule", "geometric"], "--eps-schedule does not apply"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--check-every", "3"], "--check-every does not apply"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--warmup-iter", "3"], "--warmup-iter does not apply"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--sparsity", "3"], "--sparsity does not apply"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--axis", "2"], "invalid choice"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--formulation", "primal"], "invalid choice"),
        (["solve", "--n", "10", "--method", "sparse", "--k", "2", "--gamma", "0.1", "--tol", "0"], "tol must be"),
    ]
    if not torch.cuda.is_available():
        cases.append((["solve", "--device", "cuda"], "CUDA is not available"))
    return cases


def test_bad_flags_exit_nonzero_with_message(capsys, tmp_path):
    for argv, message in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        code = exc.value.code
        # argparse exits with status 2 after printing to stderr; the CLI's own checks exit
        # with a message as the code, which Python prints to stderr with status 1
        text = code if isinstance(code, str) else capsys.readouterr().err
        assert code not in (0, None), argv
        assert message in text, (argv, text)
        assert "error" in text, (argv, text)


def _exit_message(argv) -> str:
    """The message of the CLI's own ``SystemExit`` for ``argv`` (status 1, printed by Python)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert isinstance(exc.value.code, str), f"{argv}: expected an error message, got exit code {exc.value.code!r}"
    return exc.value.code


# --------------------------------------------------------------------------- .npy input
class _Trap:
    """Unpickling this creates the folder ``path``: evidence that a file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _unreadable_files(tmp_path: Path) -> list[tuple[Path, str]]:
    """(file, expected reason, a regex) for files that do not give one array."""
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).random((6, 2)))
    (tmp_path / "text.npy").write_text("0.1 0.2\n0.3 0.4\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "truncated.npy").write_bytes(good.read_bytes()[:-8])
    np.savez(tmp_path / "two.npz", x=np.zeros((3, 2)), y=np.zeros((3, 2)))
    np.save(tmp_path / "objects.npy", np.array([_Trap(str(tmp_path / "UNPICKLED")), None], dtype=object), allow_pickle=True)
    return [
        (tmp_path / "missing.npy", "No such file or directory"),
        (tmp_path, "Is a directory"),
        (tmp_path / "text.npy", "not an .npy file"),
        (tmp_path / "empty.npy", "the file is empty"),
        (tmp_path / "truncated.npy", "12 elements|size 11"),  # numpy's own words, across versions
        (tmp_path / "two.npz", "an .npz archive"),
        (tmp_path / "objects.npy", "object array"),
    ]


@pytest.mark.parametrize("flag", ["--x", "--y"])
def test_unreadable_npy_names_flag_and_reason(tmp_path, flag):
    for path, reason in _unreadable_files(tmp_path):
        msg = _exit_message(["solve", flag, str(path), "--n", "6", "--d", "2", "--device", "cpu"])
        assert msg.startswith(f"error: cannot read {flag} {path}: "), msg
        assert re.search(reason, msg[len(f"error: cannot read {flag} {path}: "):]), (path, msg)
    assert not (tmp_path / "UNPICKLED").exists(), "the CLI unpickled a file"


def _bad_arrays() -> list[tuple[str, np.ndarray, str]]:
    nan, inf = np.ones((4, 2)), np.ones((4, 2))
    nan[1, 1], inf[2, 0] = np.nan, -np.inf
    return [
        ("strings", np.array([["a", "b"], ["c", "d"]]), "must hold real numbers (an integer or floating array), got dtype <U1"),
        ("complex", np.ones((4, 2), complex), "got dtype complex128"),
        ("bool", np.ones((4, 2), bool), "got dtype bool"),
        ("nan", nan, "contains NaN or inf"),
        ("inf", inf, "contains NaN or inf"),
        ("empty", np.zeros((0, 2)), "is empty (shape (0, 2))"),
        ("huge", np.full((4, 2), 1e300), "too large for float32"),
        ("flat", np.ones(4), "(n, d) or (B, n, d)"),
    ]


@pytest.mark.parametrize("flag", ["--x", "--y"])
@pytest.mark.parametrize("name, arr, message", _bad_arrays(), ids=[c[0] for c in _bad_arrays()])
def test_bad_npy_values_name_flag(tmp_path, flag, name, arr, message):
    path = tmp_path / f"{name}.npy"
    np.save(path, arr)
    msg = _exit_message(["solve", flag, str(path), "--n", "4", "--d", "2", "--device", "cpu"])
    assert msg.startswith(f"error: {flag} {path} "), msg
    assert message in msg, msg


def test_npy_integer_half_and_big_endian_accepted(capsys, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, (12, 2)).astype(np.int16)
    y = (rng.random((9, 2)) * 4).astype(">f8")  # big-endian: torch.from_numpy alone rejects it
    s = run_json(capsys, "--x", str(_save(tmp_path / "x.npy", x)), "--y", str(_save(tmp_path / "y.npy", y)),
                 "--eps", "0.5", "--tol", "1e-9", "--dtype", "float64")
    geom = otcore.PointCloud(torch.tensor(x.astype(np.float64)), torch.tensor(y.astype("<f8")))
    direct = otcore.sinkhorn(geom, eps=0.5, tol=1e-9)
    assert (s["n"], s["m"], s["converged"]) == (12, 9, True)
    assert s["value"] == pytest.approx(float(direct.value), rel=1e-12)

    h = rng.random((10, 2)).astype(np.float16)
    s = run_json(capsys, "--x", str(_save(tmp_path / "h.npy", h)), "--n", "7", "--d", "2", "--eps", "0.2")
    assert (s["n"], s["m"], s["dtype"], s["converged"]) == (10, 7, "float32", True)


def _save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


# --------------------------------------------------------------------------- newton
def test_solve_newton_sns_knobs_and_stages(capsys, clouds):
    x, y, xp, yp = clouds
    geom = otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y))
    flags = ("--x", xp, "--y", yp, "--method", "newton", "--eps", "0.02", "--tol", "1e-8", "--dtype", "float64")
    s = run_json(capsys, *flags, "--warmup-iter", "3", "--sparsity", "6")
    direct = otcore.sinkhorn_newton(geom, eps=0.02, tol=1e-8, max_iter=1000, warmup_iter=3, sparsity=6, verbose=False)
    assert s["method"] == "newton" and s["converged"] is True and s["marginal_error"] <= 1e-8
    stages = direct.info["eps_stages"]  # the warm-up's eps scaling (geometric by default)
    assert len(stages) > 0
    assert s["warmup_iter"] == 3 + len(stages) and s["sparsity"] == 6
    for key in ("warmup_iter", "newton_iter", "fallback_iter", "cg_iter", "line_search_evals", "sparsity"):
        assert s[key] == direct.info[key], key
    assert s["newton_iter"] > 0 and s["cg_iter"] > 0
    assert s["n_iter"] == s["warmup_iter"] + s["newton_iter"] + s["fallback_iter"] == direct.n_iter
    assert s["value"] == pytest.approx(float(direct.value), rel=1e-12)
    for key in ("time_warmup_s", "time_newton_s", "time_fallback_s"):
        assert 0 <= s[key] <= s["time_s"], key

    # without the flags the solver's defaults apply (warm-up up to 20 iterations, adaptive s)
    d = run_json(capsys, *flags)
    assert 3 + len(stages) < d["warmup_iter"] <= 20 + len(stages) and d["sparsity"] != 6
    # --eps-schedule none: the warm-up at the target eps only
    flat = run_json(capsys, *flags, "--warmup-iter", "3", "--eps-schedule", "none")
    assert flat["warmup_iter"] == 3
    assert flat["value"] == pytest.approx(d["value"], rel=1e-10)
    # --warmup-iter 0 skips the warm-up (0 is a value, not "the default")
    z = run_json(capsys, *flags, "--warmup-iter", "0")
    assert z["warmup_iter"] == 0 and z["converged"] is True
    assert z["value"] == pytest.approx(d["value"], rel=1e-10)


def test_solve_newton_table_shows_stages(capsys):
    assert main(["solve", "--method", "newton", "--n", "30", "--eps", "0.1", "--device", "cpu", "--warmup-iter", "4",
                 "--eps-schedule", "none"]) == 0
    rows = dict(re.findall(r"^  (\S+)\s+(\S.*)$", capsys.readouterr().out, re.M))
    assert rows["method"] == "newton" and rows["warmup_iter"] == "4" and rows["rho"] == "None"
    for key in ("newton_iter", "fallback_iter", "cg_iter", "line_search_evals", "sparsity", "time_newton_s"):
        assert key in rows, key


# --------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("formulation, axis", [("semi-dual", 0), ("dual", 0), ("semi-dual", 1), ("dual", 1)])
def test_solve_sparse_json_matches_library(capsys, clouds, formulation, axis):
    x, y, xp, yp = clouds  # n = 40, m = 30
    k, gamma, tol = 3, 0.1, 1e-6
    s = run_json(capsys, "--x", xp, "--y", yp, "--method", "sparse", "--k", str(k), "--gamma", str(gamma),
                 "--formulation", formulation, "--axis", str(axis), "--tol", str(tol), "--dtype", "float64")
    direct = otcore.sparse_ot(otcore.PointCloud(torch.from_numpy(x), torch.from_numpy(y)), k=k, gamma=gamma,
                              formulation=formulation, axis=axis, tol=tol, max_iter=1000)
    assert (s["method"], s["k"], s["gamma"], s["formulation"], s["axis"]) == ("sparse", k, gamma, formulation, axis)
    assert (s["n"], s["m"], s["d"], s["batch"], s["dtype"], s["backend"]) == (40, 30, 3, None, "float64", "torch")
    assert "eps" not in s and "rho" not in s
    assert s["converged"] is True and s["converged"] == direct.converged
    assert s["n_iter"] == direct.n_iter > 0
    assert s["stop"] == direct.info["stop"]
    for key in ("cost", "value"):
        assert s[key] == pytest.approx(float(getattr(direct, key)), rel=1e-12), key
    for key in ("grad_norm", "marginal_error"):
        assert s[key] == pytest.approx(getattr(direct, key), rel=1e-9, abs=1e-15), key

    # recomputed from the dense plan, with the cost computed here
    T = direct.to_dense().detach().numpy()
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    assert s["cost"] == pytest.approx(float((T * C).sum()), rel=1e-10)
    err = np.abs(T.sum(1) - 1 / 40).sum() + np.abs(T.sum(0) - 1 / 30).sum()
    assert s["marginal_error"] == pytest.approx(err, rel=1e-8, abs=1e-14)
    nz = T != 0
    assert s["nonzeros"] == int(nz.sum())
    assert s["max_nonzeros_per_column"] == int(nz.sum(0).max())
    assert s["max_nonzeros_per_row"] == int(nz.sum(1).max())
    constrained = s["max_nonzeros_per_column"] if axis == 0 else s["max_nonzeros_per_row"]
    assert 1 <= constrained <= k
    # every line of the constrained side carries mass, so the plan has at least that many entries
    assert s["nonzeros"] >= (30 if axis == 0 else 40)


def test_solve_sparse_table_and_defaults(capsys):
    assert main(["solve", "--method", "sparse", "--n", "30", "--m", "20", "--k", "2", "--gamma", "0.5", "--device", "cpu"]) == 0
    rows = dict(re.findall(r"^  (\S+)\s+(\S.*)$", capsys.readouterr().out, re.M))
    assert (rows["method"], rows["k"], rows["formulation"], rows["axis"]) == ("sparse", "2", "semi-dual", "0")
    assert rows["converged"] == "True" and 1 <= int(rows["max_nonzeros_per_column"]) <= 2
    for key in ("n_iter", "grad_norm", "marginal_error", "cost", "value", "nonzeros", "max_nonzeros_per_row", "stop"):
        assert key in rows, key
    assert "eps" not in rows


def test_solve_sparse_batched(capsys, tmp_path):
    rng = np.random.default_rng(5)
    xp, yp = save_clouds(tmp_path, rng.random((2, 20, 2)), rng.random((2, 15, 2)))
    s = run_json(capsys, "--x", xp, "--y", yp, "--method", "sparse", "--k", "3", "--gamma", "0.5", "--dtype", "float64")
    assert s["batch"] == 2
    for key in ("n_iter", "converged", "grad_norm", "marginal_error", "cost", "value", "nonzeros",
                "max_nonzeros_per_column", "max_nonzeros_per_row", "stop"):
        assert isinstance(s[key], list) and len(s[key]) == 2, key
    assert s["converged"] == [True, True] and max(s["max_nonzeros_per_column"]) <= 3
    one = otcore.sparse_ot(otcore.PointCloud(torch.from_numpy(np.load(xp)[1]), torch.from_numpy(np.load(yp)[1])),
                           k=3, gamma=0.5)
    assert s["value"][1] == pytest.approx(float(one.value), rel=1e-8)


def test_solve_eps_default_still_applies(capsys):
    """--eps defaults to None in the parser so that it can be rejected with --method sparse;
    sinkhorn and newton still get 0.05."""
    for method in ("sinkhorn", "newton"):
        s = run_json(capsys, "--n", "20", "--method", method)
        assert s["eps"] == 0.05 and s["converged"] is True, method


# --------------------------------------------------------------------------- demo input checks
@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--n", "-4"], "--n must be an integer >= 1, got -4"),
    (["--width", "0"], "--width must be an integer >= 1, got 0"),
    (["--eps", "0"], "--eps must be a finite number > 0, got 0"),
    (["--eps", "-0.1"], "--eps must be a finite number > 0"),
    (["--eps", "nan"], "--eps must be a finite number > 0, got nan"),
    (["--tol", "0"], "--tol must be a finite number > 0"),
    (["--tol", "inf"], "--tol must be a finite number > 0"),
    (["--max-iter", "0"], "--max-iter must be an integer >= 1, got 0"),
])
def test_demo_bad_values_fail_before_any_work(monkeypatch, flags, message):
    monkeypatch.setattr(cli, "_load_photo", lambda name: pytest.fail("the demo loaded a photo before checking its flags"))
    msg = _exit_message(["demo", "--device", "cpu", *flags])
    assert msg.startswith("error: ") and message in msg, msg


def _no_work(monkeypatch, what: str) -> None:
    """Make loading a photo or solving fail the test: the demo must exit before either."""
    monkeypatch.setattr(cli, "_load_photo", lambda name: pytest.fail(f"the demo loaded a photo before {what}"))
    monkeypatch.setattr(cli, "sinkhorn", lambda *a, **k: pytest.fail(f"the demo solved before {what}"))


def test_demo_bad_out_fails_before_any_work(monkeypatch, tmp_path):
    _no_work(monkeypatch, "checking --out")
    (tmp_path / "file.txt").write_text("not a folder")
    cases = [
        (tmp_path / "missing" / "x.png", f"the folder {tmp_path / 'missing'} does not exist"),
        (tmp_path / "file.txt" / "x.png", "does not exist"),
        (tmp_path, "is a folder; give a file name"),
        (tmp_path / "picture.notanimage", "not an image file name"),
        (tmp_path / "picture", "not an image file name"),
        # formats Pillow reads but cannot write, or not in RGB: they failed after the solve
        (tmp_path / "picture.psd", "Pillow cannot write an RGB PSD image"),
        (tmp_path / "picture.xbm", "Pillow cannot write an RGB XBM image"),
    ]
    for path, message in cases:
        msg = _exit_message(["demo", "--device", "cpu", "--out", str(path)])
        assert msg.startswith(f"error: --out {path}") and message in msg, msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_demo_unwritable_out_folder_fails_before_any_work(monkeypatch, tmp_path):
    _no_work(monkeypatch, "checking --out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        msg = _exit_message(["demo", "--device", "cpu", "--out", str(locked / "x.png")])
    finally:
        locked.chmod(0o700)
    assert "not writable" in msg, msg


def test_demo_unwritable_out_checked_by_access(monkeypatch, tmp_path):
    """The writability test itself (os.access), also where the tests run as root."""
    _no_work(monkeypatch, "checking --out")
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    msg = _exit_message(["demo", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert msg == f"error: --out {tmp_path / 'x.png'}: not writable (permission denied)", msg


def test_demo_backend_that_cannot_run_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _no_work(monkeypatch, "checking the backend")
    msg = _exit_message(["demo", "--device", "cpu", "--backend", "triton", "--out", str(tmp_path / "x.png")])
    assert msg.startswith("error: --backend triton on CPU tensors") and "TRITON_INTERPRET=1" in msg, msg


def test_demo_solver_errors_exit_with_message(monkeypatch, tmp_path):
    _fake_photos(monkeypatch)

    def solver(*args, **kw):
        raise TypeError("something the solver rejects")

    monkeypatch.setattr(cli, "sinkhorn", solver)
    out = tmp_path / "x.png"
    assert _exit_message(["demo", "--device", "cpu", "--n", "20", "--out", str(out)]) == "error: something the solver rejects"
    assert not out.exists()


def test_demo_solver_errors_name_the_flag(monkeypatch, tmp_path):
    """``demo --eps 1e300`` said ``eps=...`` where ``solve`` says ``--eps=...`` (a review)."""
    _fake_photos(monkeypatch)
    msg = _exit_message(["demo", "--device", "cpu", "--n", "20", "--eps", "1e300", "--out", str(tmp_path / "x.png")])
    assert msg.startswith("error: --eps=1e+300 is too large"), msg


def test_demo_overwrites_its_picture_whole_or_not_at_all(monkeypatch, tmp_path):
    """A failed overwrite had left the old picture truncated: it is written to a temporary
    file beside it and renamed over it, with the old file's permissions."""
    from PIL import Image

    _fake_photos(monkeypatch)
    out = tmp_path / "x.png"
    out.write_bytes(b"the old picture")
    os.chmod(out, 0o640)
    real = Image.Image.save

    def failing(self, fp, *args, **kw):  # (the up-front check's probe into memory passes)
        real(self, fp, *args, **kw)
        if not isinstance(fp, io.BytesIO):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing)
    flags = ["demo", "--device", "cpu", "--n", "20", "--out", str(out)]
    assert _exit_message(flags) == f"error: cannot write --out {out}: No space left on device"
    assert out.read_bytes() == b"the old picture" and sorted(os.listdir(tmp_path)) == ["x.png"]
    monkeypatch.setattr(Image.Image, "save", real)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(flags) == 0
    assert Image.open(out).size[1] == 30 and (os.stat(out).st_mode & 0o777) == 0o640


def _fake_photos(monkeypatch, shape=(30, 40, 3)):
    """Small synthetic photos instead of scikit-learn's (no sklearn needed, fast)."""
    rng = np.random.default_rng(0)
    photos = {"china.jpg": rng.integers(0, 256, shape, dtype=np.uint8),
              "flower.jpg": rng.integers(0, 256, shape, dtype=np.uint8)}
    monkeypatch.setattr(cli, "_load_photo", lambda name: photos[name])


class _Stop(Exception):
    pass


def test_demo_defaults_only_when_flags_absent(monkeypatch):
    _fake_photos(monkeypatch, (500, 700, 3))
    seen = {}
    real_resize = cli._resize

    def resize(img, width):
        seen["width"] = width
        return real_resize(img, width)

    def solver(geom, **kw):
        seen["n"], seen["m"], seen["eps"] = geom.n, geom.m, kw["eps"]
        raise _Stop

    monkeypatch.setattr(cli, "_resize", resize)
    monkeypatch.setattr(cli, "sinkhorn", solver)
    with pytest.raises(_Stop):
        main(["demo", "--device", "cpu"])
    assert seen == {"width": 320, "n": 2000, "m": 2000, "eps": 0.01}
    with pytest.raises(_Stop):
        main(["demo", "--device", "cpu", "--n", "7", "--width", "50", "--eps", "0.3"])
    assert seen == {"width": 50, "n": 7, "m": 7, "eps": 0.3}


def test_demo_verbose_forces_the_progress_line(monkeypatch):
    """--verbose shows progress in pipes and logs too (verbose=True); without it, on a
    terminal only (verbose=None: it was False, and the demo sat silent for 24 s there)."""
    _fake_photos(monkeypatch)
    seen = []

    def solver(geom, **kw):
        seen.append(kw["verbose"])
        raise _Stop

    monkeypatch.setattr(cli, "sinkhorn", solver)
    for flags in ([], ["--verbose"]):
        with pytest.raises(_Stop):
            main(["demo", "--device", "cpu", "--n", "20", *flags])
    assert seen == [None, True]


def test_demo_writes_no_picture_from_a_failed_solve(monkeypatch, tmp_path):
    """eps far below float32's resolution: the map is NaN. It used to write a garbage picture
    (and exit 0); now an error, and no file."""
    _fake_photos(monkeypatch)
    out = tmp_path / "x.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        msg = _exit_message(["demo", "--device", "cpu", "--n", "20", "--eps", "1e-12", "--out", str(out)])
    assert msg.startswith("error: the solve failed") and "no image written" in msg and not out.exists()


def test_demo_reports_pixels_actually_sampled(monkeypatch, capsys, tmp_path):
    _fake_photos(monkeypatch, (30, 40, 3))
    out = tmp_path / "small.png"
    assert main(["demo", "--device", "cpu", "--n", "100000", "--width", "16", "--eps", "0.05", "--out", str(out)]) == 0
    rows = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", capsys.readouterr().out, re.M))
    assert rows["n = m (pixels sampled)"] == str(16 * 12)  # all of the 16 x 12 resized image, not 100000
    assert out.exists()


# --------------------------------------------------------------------------- docs/cli.md
def _cli_md_commands() -> list[tuple[int, str]]:
    """``(line, command)`` of every command in the ```bash blocks of docs/cli.md, comments
    dropped and backslash continuations joined; ``otcore demo`` commands left out (they
    take tens of seconds on a CPU; the tests above run the demo small)."""
    text = (ROOT / "docs/cli.md").read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text.count("\n", 0, m.start()) + 2
        pending, start = "", None
        for i, line in enumerate(m.group(1).splitlines()):
            if start is None:
                start = first + i
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            words = shlex.split(pending, comments=True)
            if words and words[:2] != ["otcore", "demo"]:
                out.append((start, shlex.join(words)))
            pending, start = "", None
    return out


def test_cli_md_has_runnable_examples_of_every_method():
    commands = [c for _, c in _cli_md_commands()]
    for method in ("sinkhorn", "newton", "sparse"):
        assert any(c.startswith("otcore solve") and (f"--method {method}" in c or (method == "sinkhorn" and "--method" not in c))
                   for c in commands), method


def test_cli_md_commands_run(capsys, tmp_path, monkeypatch):
    """Every command of docs/cli.md's bash blocks (but the demo) runs in-process, in order,
    in an empty folder: ``otcore ...`` through :func:`main`, ``python -c CODE`` by ``exec``.
    Each solve must converge (every problem of a batch; a ``ConvergenceWarning`` is an error)."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for line, command in _cli_md_commands():
        words = shlex.split(command)
        where = f"docs/cli.md:{line}: {command}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", otcore.ConvergenceWarning)
            if words[:2] == ["python", "-c"] and len(words) == 3:
                exec(compile(words[2], where, "exec"), {"__name__": "__cli_md__"})
                continue
            argv = words[1:] if words[0] == "otcore" else words[3:] if words[:3] == ["python", "-m", "otcore"] else None
            assert argv is not None, f"{where}: not an otcore command"
            if "--device" not in argv and argv and argv[0] == "solve":
                argv += ["--device", "cpu"]
            assert main(argv) == 0, where
        out = capsys.readouterr().out
        summary = json.loads(out) if "--json" in argv else dict(re.findall(r"^  (\S+)\s+(\S.*)$", out, re.M))
        converged = summary["converged"]  # a list for a batched input
        assert all(c in (True, "True") for c in (converged if isinstance(converged, list) else [converged])), (where, out)


#: docs/cli.md's sample summaries: the command each ```text block (told apart by its method
#: row) was printed by
CLI_MD_SAMPLES = {
    "sinkhorn": ["solve", "--n", "500", "--eps", "0.01"],
    "newton": ["solve", "--method", "newton", "--n", "500", "--eps", "0.002", "--tol", "1e-8", "--dtype", "float64"],
    "sparse": ["solve", "--method", "sparse", "--n", "300", "--m", "40", "--k", "8", "--gamma", "0.5"],
}


def test_cli_md_sample_summaries_are_what_the_commands_print(capsys):
    """docs/cli.md's printed summaries hold the rows the commands print now, with their
    values (times aside; numbers to a margin for another CPU's rounding). A review found
    the sparse sample three rows short and every float32 sample stale after a change of
    the random points."""
    text = (ROOT / "docs/cli.md").read_text(encoding="utf-8")
    samples = {}
    for block in re.findall(r"^```text\n(.*?)^```", text, re.S | re.M):
        rows = dict(re.findall(r"^  (\S+)\s+(\S.*)$", block, re.M))
        if "method" in rows:
            samples[rows["method"]] = rows
    assert sorted(samples) == sorted(CLI_MD_SAMPLES)
    for method, argv in CLI_MD_SAMPLES.items():
        capsys.readouterr()
        assert main(argv + ["--device", "cpu", "--quiet"]) == 0
        now = dict(re.findall(r"^  (\S+)\s+(\S.*)$", capsys.readouterr().out, re.M))
        doc = samples[method]
        assert list(doc) == list(now), (method, list(doc), list(now))  # the same rows, in order
        for key, shown in doc.items():
            if key.startswith("time"):
                continue
            try:
                shown_f, now_f = float(shown), float(now[key])
            except ValueError:
                assert shown == now[key], (method, key)
                continue
            # errors and gradient norms are roundings' sums: their order of magnitude is the claim
            rel = 0.5 if key in ("marginal_error", "residual", "grad_norm") else 0.1 if "iter" in key else 1e-3
            assert now_f == pytest.approx(shown_f, rel=rel), (method, key, shown, now[key])


# --------------------------------------------------------------------------- entry point
def _env() -> dict:
    """The environment of a subprocess that imports this checkout's otcore."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otcore", *args], capture_output=True, text=True, env=_env(),
                          timeout=120)


def test_python_m_help():
    p = _python_m("--help")
    assert p.returncode == 0, p.stderr
    assert "demo" in p.stdout and "solve" in p.stdout


def test_python_m_bad_value_exit_status():
    p = _python_m("solve", "--eps", "0", "--n", "10")
    assert p.returncode != 0
    assert "error: --eps must be" in p.stderr and p.stdout == ""


def test_python_m_unconverged_exits_3_with_a_plain_warning():
    """A solve that ran but did not converge: its summary still goes to stdout, the exit status
    is 3 and stderr has one 'warning: ...' line (not Python's file path and source line)."""
    p = _python_m("solve", "--n", "50", "--max-iter", "1", "--json", "--device", "cpu")
    assert p.returncode == 3, p.stderr
    assert json.loads(p.stdout)["converged"] is False
    assert p.stderr.startswith("warning: sinkhorn did not converge") and p.stderr.count("\n") == 1, p.stderr
    assert _python_m("--version").stdout.strip() == f"otcore {otcore.__version__}"


def test_main_in_process_leaves_warnings_to_the_caller():
    """Only the program prints warnings as 'warning: ...' lines; main() called in-process
    leaves them to Python's warnings (it had replaced showwarning, so pytest.warns and
    catch_warnings(record=True) recorded nothing)."""
    with pytest.warns(otcore.ConvergenceWarning, match="did not converge"):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["solve", "--n", "30", "--max-iter", "1", "--json", "--device", "cpu"]) == 3


def test_a_batch_with_one_unconverged_problem_exits_3(tmp_path):
    """The exit status says whether every problem of a batch converged: problem 0 (a tiny
    cloud) converges at once, problem 1 cannot in 30 iterations at eps 1e-3; status 3, as
    for one problem (a mutant reading "any converged" exited 0 here, every test passing)."""
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 40, 2)), rng.random((2, 30, 2))
    x[0] *= 1e-3
    y[0] *= 1e-3
    xp, yp = save_clouds(tmp_path, x, y)
    out = io.StringIO()
    with pytest.warns(otcore.ConvergenceWarning, match="1 of 2"), contextlib.redirect_stdout(out):
        status = main(["solve", "--x", xp, "--y", yp, "--eps", "0.001", "--max-iter", "30", "--dtype", "float64",
                       "--json", "--device", "cpu", "--backend", "torch"])
    assert json.loads(out.getvalue())["converged"] == [True, False]
    assert status == 3


def _python_c(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)


def test_the_program_without_a_stderr_keeps_its_json_and_its_status():
    """``sys.stderr`` None (pythonw, some service hosts): every default solve raised from the
    progress line's isatty, and the warnings went to stdout ahead of ``--json``'s object (a
    review). Now nothing is printed there and the summary and status stand."""
    code = ("import sys; sys.stderr = None; sys.argv = ['otcore', 'solve', '--n', '20', '--max-iter', '1', "
            "'--json', '--device', 'cpu']; from otcore import cli; cli.entry()")
    p = _python_c(code)
    assert p.returncode == 3, p.stdout
    assert json.loads(p.stdout)["converged"] is False  # the whole of stdout is the summary
    p = _python_c("import sys, torch, otcore; sys.stderr = None; "
                  "print(otcore.sinkhorn(otcore.PointCloud(torch.rand(20, 3), torch.rand(25, 3)), eps=0.1).converged)")
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stdout


def test_a_closed_stderr_neither_ends_the_run_nor_the_progress_line():
    """fd 2 closed: the warning's write raised OSError and an unconverged solve exited 1
    without its summary; ``verbose=True`` died in its first progress line (a review)."""
    code = ("import os, sys; os.close(2); sys.argv = ['otcore', 'solve', '--n', '20', '--max-iter', '1', "
            "'--json', '--device', 'cpu']; from otcore import cli; cli.entry()")
    p = _python_c(code)
    assert p.returncode == 3 and json.loads(p.stdout)["converged"] is False
    code = ("import os, torch, otcore; from otcore import _progress; os.close(2); "
            "bar = _progress.Progress(True, 'test'); bar.last = -1.0; bar.update(1, 0.5, 0.1); bar.close(); "
            "print(bar.enabled)")
    p = _python_c(code)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout


def test_output_the_reader_does_not_take_ends_without_a_traceback():
    """A full disk (/dev/full) and a reader that left the pipe ended in a Python traceback."""
    code = "from otcore import cli; cli.entry()"
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-c", code, "solve", "--n", "20", "--device", "cpu"],
                               stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=_env())
        assert p.returncode == 1 and p.stderr.startswith("error: cannot write the output"), p.stderr
        assert "Traceback" not in p.stderr
    proc = subprocess.Popen([sys.executable, "-c", code, "solve", "--n", "20", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # the reader leaves before the summary
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err, err


def test_a_closed_stderr_file_object_turns_the_progress_line_off(monkeypatch):
    """sys.stderr a closed file object (not fd 2: a closed io.StringIO, as a harness may leave
    it): its write raises ValueError, which turns the line off instead of ending the solve
    (a mutation test)."""
    from otcore._progress import Progress

    dead = io.StringIO()
    dead.close()
    monkeypatch.setattr(sys, "stderr", dead)
    p = Progress(True, "sinkhorn")
    p.last = -1.0
    p.update(3, 1e-3, 0.1)
    assert not p.enabled and not p.printed
    p.update(4, 1e-4, 0.1)
    p.close()


def test_a_closed_stdout_is_an_error_before_the_solve():
    """fd 1 closed: the run solved, printed nowhere and exited 0."""
    code = ("import os, sys; os.close(1); sys.stdout = None; sys.argv = ['otcore', 'solve', '--n', '20', "
            "'--device', 'cpu']; from otcore import cli; cli.main = None; cli.entry()")  # (main must not run)
    p = _python_c(code)
    assert p.returncode == 1 and p.stderr == "error: cannot write the output: standard output is closed\n", p.stderr


@pytest.mark.parametrize("flags,message", [
    (["--eps", "0"], "error: --eps must be"), (["--max-iter", "0"], "error: --max-iter must be"),
    (["--eps-schedule", "5"], "error: --eps-schedule"), (["--tol", "-1"], "error: --tol must be"),
    (["--rho", "-1"], "error: --rho must be"),
])
def test_solve_number_flags_fail_before_the_clouds_are_drawn(monkeypatch, flags, message):
    """They were checked by the solver, after the points: 17-20 s into --n 50000000."""
    def drawn(*args, **kw):
        raise AssertionError("the clouds were drawn")

    monkeypatch.setattr(cli, "_clouds", drawn)
    assert _exit_message(["solve", "--n", "50000000", "--device", "cpu", *flags]).startswith(message)


def test_python_m_json_stdout_is_one_object():
    p = _python_m("solve", "--n", "25", "--eps", "0.1", "--json", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)  # nothing else on stdout
    assert s["n"] == 25 and s["converged"] is True


# --------------------------------------------------------------------------- demo
def _expected_png_size(width: int) -> tuple[int, tuple[int, int]]:
    """(source width, (total width lower bound, height)) of the side-by-side picture."""
    from sklearn.datasets import load_sample_image

    H, W = load_sample_image("china.jpg").shape[:2]
    Ht, Wt = load_sample_image("flower.jpg").shape[:2]
    h = round(H * width / W)
    tgt_h = round(Ht * width / Wt)  # the target is resized to `width`, then to the source's height
    tgt_w = round(width * h / tgt_h)
    return h, (width + tgt_w + width, h)


def test_demo_writes_picture_and_table(capsys, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = tmp_path / "demo.png"
    assert main(["demo", "--n", "300", "--width", "64", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    # the picture: source | target | result, side by side, at the source's resized height
    assert out.exists()
    img = np.asarray(Image.open(out).convert("RGB")).astype(np.float64) / 255
    h, (min_w, _) = _expected_png_size(64)
    assert img.shape[0] == h
    assert min_w <= img.shape[1] <= min_w + 32  # plus the separating gaps
    source, result = img[:, :64], img[:, -64:]
    photo = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((64, h))).astype(np.float64) / 255
    assert np.abs(source - photo).mean() < 0.05
    # colour transfer: the result's mean colour moves most of the way to the target's
    target_mean = load_sample_image("flower.jpg").reshape(-1, 3).mean(0) / 255
    before = np.linalg.norm(source.reshape(-1, 3).mean(0) - target_mean)
    after = np.linalg.norm(result.reshape(-1, 3).mean(0) - target_mean)
    assert after < 0.3 * before

    # the table: every field, with this run's values
    rows = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", printed, re.M))
    assert rows["n = m (pixels sampled)"] == "300"
    assert rows["eps"].startswith("0.01")
    assert int(rows["iterations"]) > 0
    err = re.match(r"([0-9.e+-]+) \(tol ([0-9.e+-]+), converged=True\)", rows["marginal error"])
    # the stopping test counts the row residual only (the column one is zero after a column
    # update, up to rounding); in float32 at eps = 0.01 that rounding is ~1e-6, so the
    # recomputed error of a converged solve may sit a few percent above tol
    assert err and float(err.group(1)) <= 1.1 * float(err.group(2))
    assert re.fullmatch(r"[0-9.]+ s", rows["solve time"])
    assert rows["map time"].endswith("pixels through the entropic map)")
    assert (rows["device"], rows["backend"], rows["image"]) == ("cpu", "torch", str(out))


def test_seed_out_of_range_is_a_flag_error(capsys):
    for cmd in (["solve", "--n", "10"], ["demo", "--n", "10"]):
        # torch's CPU generator takes the low 32 bits of a seed: 2**32 would repeat seed 0
        for seed, word in (("-1", ">= 0"), (str(2**32), "<= 4294967295")):
            with pytest.raises(SystemExit, match=f"--seed must be an integer {word}"):
                main([*cmd, "--seed", seed, "--device", "cpu"])


def test_json_writes_null_for_non_finite_numbers(capsys):
    """A failed solve's inf cost is null: strict JSON has no Infinity (json.loads with
    parse_constant raising proves none is printed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", otcore.ConvergenceWarning)
        assert main(["solve", "--json", "--device", "cpu", "--n", "20", "--eps", "1e-12", "--max-iter", "1"]) == 3
    out, _ = capsys.readouterr()

    def strict(token):
        raise AssertionError(f"non-JSON constant {token}")

    s = json.loads(out, parse_constant=strict)
    assert s["converged"] is False and s["cost"] is None and s["marginal_error"] is None


def test_progress_line_leaves_out_unknown_fields(capsys):
    """Sparse OT has no eps and eps stages no error yet: those fields are left out, not
    printed as 'nan' (which read as a numerical failure); the sparse solver's measure is
    named for what it is."""
    from otcore._progress import Progress

    p = Progress(True, "sparse_ot", measure="gradient norm")
    q = Progress(True, "sinkhorn")
    p.last = q.last = -1.0  # due now (a line is refreshed at most every 0.25 s)
    p.update(188, 5.4e-2, None, "L-BFGS")
    q.update(4, None, 2.22, "eps stage 4/98")
    err = capsys.readouterr().err
    assert "nan" not in err
    assert "sparse_ot iter    188 | gradient norm 5.400e-02 | L-BFGS |" in err
    assert "sinkhorn iter      4 | eps 2.22 | eps stage 4/98 |" in err
    # a shorter line after a longer one on the same row is padded over it (a SNS fallback's
    # Sinkhorn line after a longer Newton line left stale characters); a diverged error shows
    q.last = -1.0
    q.update(5, float("nan"), 2.22)
    line = capsys.readouterr().err
    assert "marginal error nan" in line and len(line) - 1 >= q.width >= len("sinkhorn iter      4 | eps 2.22 | eps stage 4/98 |")
    q.last = -1.0  # an error of exactly 0 is a value: shown (a truth test had left it out, a mutation test)
    q.update(6, 0.0, 2.22)
    assert "sinkhorn iter      6 | marginal error 0.000e+00 | eps 2.22 |" in capsys.readouterr().err
    q.close()
    q.close()  # one newline, however often closed
    assert capsys.readouterr().err == "\n"


def test_a_schedule_longer_than_max_iter_names_the_flags():
    """The solver's message names max_iter and eps_schedule; the command line's user typed
    --max-iter and --eps-schedule (only a message's first word had been turned into its flag)."""
    msg = _exit_message(["solve", "--n", "50", "--device", "cpu", "--eps", "0.01", "--eps-schedule", "geometric",
                         "--max-iter", "3"])
    assert msg.startswith("error: --max-iter=3 counts the eps-scaling stages, and --eps-schedule gives "), msg
    assert "give --max-iter > " in msg and "max_iter" not in msg and "eps_schedule" not in msg, msg
    assert "before eps=0.01" in msg  # (a plain word, the quantity, is left as it is)
