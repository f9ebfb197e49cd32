"""Pruning and QAT under MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Each test starts a real two-worker cluster (tests/multi_worker_job.py, ports
from the OS, every process killed if the cluster outlives its time) and
checks what a user relies on: both workers end with the same variables
(weights, masks, the pruning step, activation ranges), a cluster killed
mid-schedule resumes through BackupAndRestore to the very result of an
uninterrupted run, and only the chief exports.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tfopt
from tfopt import _compat

JOB = Path(__file__).with_name("multi_worker_job.py")
KILLED = 17

pytestmark = pytest.mark.skipif(
    ".".join(__import__("keras").__version__.split(".")[:2]) not in
    _compat.MULTI_WORKER_FIXED_KERAS, reason="tfopt.distribute's fixes refuse this Keras")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster(mode: str, out: Path, epochs: int, kill_after=None, timeout: float = 120) -> list:
    """Run a two-worker cluster to its end; return each worker's exit status."""
    out.mkdir(parents=True, exist_ok=True)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3",
               "CUDA_VISIBLE_DEVICES": ""}
        args = [sys.executable, str(JOB), mode, str(out), str(epochs)]
        if kill_after is not None:
            args.append(str(kill_after))
        processes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        logs = [p.communicate()[0] for p in processes]
        pytest.fail("the cluster ran past its time:\n" + "\n".join(log[-3000:] for log in logs))
    for p, log in zip(processes, logs):
        if p.returncode not in (0, KILLED):
            pytest.fail(f"a worker failed ({p.returncode}):\n{log[-4000:]}")
    return [p.returncode for p in processes]


def weights(out: Path, index: int) -> dict:
    with np.load(out / f"weights-{index}.npz") as data:
        return {k: data[k] for k in data.files}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_only_the_chief_exported(out: Path) -> None:
    chief, other = (json.loads((out / f"export-{i}.json").read_text()) for i in (0, 1))
    assert chief["chief"] and chief["skipped"] is None and chief["paths"]
    assert not other["chief"] and other["paths"] == {}
    assert other["skipped"] == "worker 1 is not the chief; the chief exports"
    assert Path(chief["paths"]["onnx"]).exists()
    assert (out / "export" / "manifest.json").exists()


def test_pruning_on_two_workers_is_identical_resumes_exactly_and_exports_once(tmp_path):
    full = tmp_path / "full"
    assert cluster("prune", full, epochs=4) == [0, 0]
    first, second = weights(full, 0), weights(full, 1)
    assert_identical(first, second)
    masks = [v for k, v in first.items() if k.endswith("mask")]
    assert masks and all(abs(1 - m.mean() - 0.7) < 0.01 for m in masks)
    assert_only_the_chief_exported(full)

    resumed = tmp_path / "resumed"
    assert cluster("prune", resumed, epochs=4, kill_after=1) == [KILLED, KILLED]
    assert not (resumed / "weights-0.npz").exists()
    # Each worker backed up to a path of its own: no collision on one file.
    assert (resumed / "backup").exists() and (resumed / "backup.worker-1").exists()
    for index in (0, 1):
        (resumed / f"first-epoch-{index}").unlink()
    assert cluster("prune", resumed, epochs=4) == [0, 0]
    assert [(resumed / f"first-epoch-{i}").read_text() for i in (0, 1)] == ["2", "2"]
    assert_identical(weights(resumed, 0), weights(resumed, 1))
    assert_identical(weights(resumed, 0), first)  # as if never killed


def test_qat_on_two_workers_is_identical_and_exports_once(tmp_path):
    assert cluster("qat", tmp_path, epochs=2) == [0, 0]
    first, second = weights(tmp_path, 0), weights(tmp_path, 1)
    assert_identical(first, second)
    ranges = [k for k in first if "amax" in k or "range" in k]
    assert ranges, sorted(first)[:10]
    assert_only_the_chief_exported(tmp_path)


def test_worker_identity_and_paths_follow_tf_config(monkeypatch, tmp_path):
    def as_task(task_type, index, cluster=("worker",)):
        spec = {name: ["127.0.0.1:1", "127.0.0.1:2"] for name in cluster}
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": spec, "task": {"type": task_type, "index": index}}))

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tfopt.distribute.is_chief()
    assert tfopt.distribute.worker_path(tmp_path / "ckpt") == tmp_path / "ckpt"
    as_task("worker", 0)
    assert tfopt.distribute.is_chief()
    as_task("worker", 1)
    assert not tfopt.distribute.is_chief()
    assert tfopt.distribute.worker_path(tmp_path / "ckpt") == tmp_path / "ckpt.worker-1"
    as_task("worker", 0, cluster=("chief", "worker"))
    assert not tfopt.distribute.is_chief()  # a cluster with a chief: worker 0 is not it
    as_task("chief", 0, cluster=("chief", "worker"))
    assert tfopt.distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(tfopt.errors.ConfigError, match="TF_CONFIG"):
        tfopt.distribute.is_chief()


def test_export_on_a_worker_that_is_not_the_chief_writes_nothing(monkeypatch, tmp_path):
    from tfopt.examples import digits_cnn

    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 1}}))
    result = tfopt.export(digits_cnn(), tmp_path / "out")
    assert result.paths == {} and not (tmp_path / "out").exists()
    assert "worker 1 is not the chief" in result.summary()


def test_the_fixes_refuse_a_keras_they_were_not_tested_on(monkeypatch):
    monkeypatch.setattr(_compat.keras, "__version__", "3.99.0")
    with pytest.raises(tfopt.errors.ConfigError, match="3.99.0"):
        with tfopt.distribute.multi_worker_fixes():
            pass


def test_the_fixes_are_undone_on_exit():
    from keras.src.backend.tensorflow import trainer

    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    with tfopt.distribute.multi_worker_fixes():
        assert trainer.reduce_per_replica is not reduce
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is build
    assert trainer.reduce_per_replica is reduce
