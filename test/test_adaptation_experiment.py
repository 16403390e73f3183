"""The adaptation experiment runner end to end in --smoke mode (generated frames), resumable, in parallel."""
import importlib.util
import json
import os

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "adaptation.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("adaptation_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(experiment, tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    assert experiment.main(["--smoke", "--work", str(work), "--out", str(work / "results")]) == 0
    return work


def test_smoke_run_writes_every_unit_and_the_report(experiment, smoke_run):
    """Every arm x seed (and the shipped model) has a finished unit with per-frame statistics of every
    set; the report holds every arm with intervals, the command, and no verdict lines; plots are PNGs."""
    work = experiment.Work(smoke_run)
    exp = experiment._experiment_from_file(smoke_run / "experiment.json")
    units = experiment.plan(exp)
    assert len(units) == 1 + 2 + 2 * 6 + 1 + 2 * 7
    assert all(work.done(u.name)["experiment"] == exp.digest() for u in units)
    for name in ("eval-shipped", "eval-gamma_ssl_frozen-s1"):
        assert all((work.unit(name) / f"stats_{s}.npz").is_file() for s in experiment.SETS)
        fits = json.loads((work.unit(name) / "fits.json").read_text())
        assert set(fits["calibration"]) == {"temperature", "selective_balanced", "selective_duplicate"}
        assert fits["calibration"]["selective_duplicate"]["fit"]["selective"]["weighting"] == "duplicate"
    prov = json.loads((work.bundle_of(exp, "source", 0) / "config.json").read_text())["provenance"]
    assert prov["stage"] == "supervised (continued)" and prov["mask_ratio_max"] == 0.5 and prov["class_weighting"] == "inverse_sqrt"
    frozen = json.loads((work.bundle_of(exp, "gamma_ssl_frozen", 1) / "config.json").read_text())["provenance"]
    assert frozen["adapt_config"]["backbone_lr_mult"] == 0.0 and frozen["input_bundle"]["path"] == str(work.bundle_of(exp, "source", 1))

    md = (smoke_run / "results" / "adaptation.md").read_text()
    assert "Reproduce: `python benchmarks/adaptation.py --smoke" in md and "beats" not in md
    for arm in (*experiment.ARMS, "shipped"):
        assert f"| {arm} |" in md
    summary = json.loads((smoke_run / "results" / "adaptation.json").read_text())["summary"]
    test_part = summary["sets"]["dusk_test"]
    assert test_part["frames"] == 3 and len(test_part["arms"]["both"]["max_softmax:auroc"]["seeds"]) == 2
    lo, hi = test_part["arms"]["both"]["minus_control"]["miou"]["ci95"]
    assert lo <= hi
    assert summary["selection"]["arm"] in experiment.ARMS
    for png in ("adaptation.png", "adaptation_reliability.png"):
        assert (smoke_run / "results" / png).read_bytes()[:4] == b"\x89PNG"


def test_a_killed_run_continues_where_it_stopped(experiment, smoke_run):
    """Units without done.json run again, in two processes (--jobs 2); finished units are skipped
    untouched; a work folder of another configuration is refused."""
    work = experiment.Work(smoke_run)
    kept = work.unit("eval-control-s0") / "done.json"
    stamp = kept.stat().st_mtime_ns
    for name in ("adapt-both-s1", "eval-both-s1"):
        os.remove(work.unit(name) / "done.json")
    assert experiment.main(["--smoke", "--work", str(smoke_run), "--out", str(smoke_run / "results"), "--jobs", "2"]) == 0
    assert work.done("adapt-both-s1") and work.done("eval-both-s1")
    assert (smoke_run / "logs" / "eval-both-s1.log").is_file() and kept.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="another configuration"):
        experiment.main(["--smoke", "--work", str(smoke_run), "--out", str(smoke_run / "results"), "--arms", "control"])


def test_time_estimate_from_a_shorter_run(experiment, smoke_run):
    """The projection scales the training units by their steps: more steps cost more, in CPU and elapsed time."""
    exp = experiment._experiment_from_file(smoke_run / "experiment.json")
    work = experiment.Work(smoke_run)
    same = experiment.estimate(exp, work, jobs=2)
    longer = experiment.estimate(experiment.replace(exp, adapt_steps=20, source_steps=20), work, jobs=2)
    assert longer["cpu_h"] > same["cpu_h"] and longer["elapsed_h"] >= same["elapsed_h"] > 0
    assert same["elapsed_h"] <= same["cpu_h"], "two jobs at once"
