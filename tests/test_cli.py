"""The command line: ``otcore solve``, ``otcore demo`` and ``python -m otcore``.

Most tests call :func:`otcore.cli.main` in-process (no interpreter start-up); three
run the real entry point in a subprocess to check exit statuses and that stdout
carries nothing but the JSON object.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import otcore
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
    try:
        otcore.sinkhorn_newton(geom, eps=0.1, tol=1e-3, verbose=False)
    except NotImplementedError as e:
        pytest.skip(f"otcore.sinkhorn_newton is not implemented: {e}")
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
        (["solve", "--eps", "-1"], "eps must be"),
        (["solve", "--n", "10", "--tol", "0"], "tol must be"),
        (["solve", "--n", "10", "--rho", "-2"], "rho must be"),
        (["solve", "--eps-schedule", "sometimes"], "--eps-schedule"),
        (["solve", "--x", str(tmp_path / "flat.npy")], "(n, d) or (B, n, d)"),
        (["solve", "--x", str(x2), "--y", str(y3)], "same dimension d"),
        (["demo", "--backend", "cupy"], "invalid choice"),
        (["demo", "--device", "tpu"], "invalid choice"),
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


# --------------------------------------------------------------------------- entry point
def _python_m(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "otcore", *args], capture_output=True, text=True, env=env, timeout=120)


def test_python_m_help():
    p = _python_m("--help")
    assert p.returncode == 0, p.stderr
    assert "demo" in p.stdout and "solve" in p.stdout


def test_python_m_bad_value_exit_status():
    p = _python_m("solve", "--eps", "0", "--n", "10")
    assert p.returncode != 0
    assert "error: eps must be" in p.stderr and p.stdout == ""


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
    pytest.importorskip("sklearn", reason="otcore demo needs the [demo] extra")
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
    assert err and float(err.group(1)) <= float(err.group(2))
    assert re.fullmatch(r"[0-9.]+ s", rows["solve time"])
    assert rows["map time"].endswith("pixels through the entropic map)")
    assert (rows["device"], rows["backend"], rows["image"]) == ("cpu", "torch", str(out))
