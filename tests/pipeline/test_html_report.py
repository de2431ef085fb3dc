"""report.html's content: the Pareto front, the y axis each device gets, and folders that are not runs."""
import json

import pytest

from edgesmith.pipeline.html_report import ReportError, RunRecord, _points, _scatter, load_runs, pareto_front


def _candidate(target, backend, precision, p50, accuracy=None, cosine=None, status="passed", metric="auto"):
    return {"stage": "export", "target": target, "backend": backend, "precision": precision, "status": status,
            "accuracy": accuracy, "metric": metric, "latency_ms": None if p50 is None else {"p50": p50},
            "fidelity": None if cosine is None else {"cosine": cosine}}


def test_the_pareto_front_keeps_only_points_no_other_beats_on_both_latency_and_metric():
    points = [{"p50": p50, "y": y, "name": name} for name, p50, y in [
        ("slow and best", 9.0, 99.0), ("fast and worse", 1.0, 97.0), ("dominated", 5.0, 96.0),
        ("middle", 4.0, 98.0), ("tie slower", 4.5, 98.0)]]
    assert [p["name"] for p in pareto_front(points)] == ["fast and worse", "middle", "slow and best"]


def test_each_device_plots_the_metric_where_every_candidate_has_one_else_fidelity():
    classifier = RunRecord("cls", "m", "r", [
        _candidate("x86-host", "onnxruntime", "int8", 0.5, accuracy=97.0, cosine=0.99, status="chosen"),
        _candidate("x86-host", "tvm", "fp32", 2.0, accuracy=98.0, cosine=1.0),
        _candidate("x86-host", "tvm", "int8", None, accuracy=97.0),                   # not timed: not plotted
        _candidate("x86-host", "onnxruntime", "fp16", 0.7, status="failed: parity")])  # failed: not plotted
    points, axis = _points("x86-host", [classifier])
    assert axis == "top-1 accuracy %" and [p["y"] for p in points] == [97.0, 98.0]
    assert [p["chosen"] for p in points] == [True, False]
    encoder = RunRecord("enc", "m", "r", [_candidate("x86-host", "onnxruntime", "int8", 0.4, cosine=0.995,
                                                     metric="none")])
    points, axis = _points("x86-host", [classifier, encoder])   # one run without a metric: fidelity for all
    assert axis == "cosine to the reference model" and [p["y"] for p in points] == [0.99, 1.0, 0.995]


def test_a_label_that_would_cover_another_is_left_out():
    runs = [RunRecord(name, "m", "r", [_candidate("x86-host", "onnxruntime", "int8", 0.5, accuracy=accuracy,
                                                  status="chosen")]) for name, accuracy in (("a", 97.0), ("b", 97.1))]
    runs.append(RunRecord("c", "m", "r", [_candidate("x86-host", "tvm", "fp32", 5.0, accuracy=90.0, status="chosen")]))
    svg = _scatter("x86-host", runs)
    assert svg.count(">onnxruntime/int8<") == 1 and svg.count(">tvm/fp32<") == 1


def test_a_folder_that_is_neither_a_run_nor_a_batch_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="holds neither batch.json nor results.json"):
        load_runs([tmp_path])
    (tmp_path / "results.json").write_text(json.dumps([]))
    assert load_runs([tmp_path])[0].label == tmp_path.name
