"""Tests of scale-out: the sharded training step, sharded checkpoints, many processes, the CLI.

The checks on 8 devices run in one subprocess with 8 simulated CPU devices
(`_distributed_worker.py`), so that the rest of the suite keeps its single device; the
multi-process check starts two processes joined by `jax.distributed.initialize` on localhost
(`_multihost_worker.py`).
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from train import _cli, _distributed
from train._checkpoint import save_config
from train._model import ModelConfig
from tests.softmax_alts.test_parallel import REPO, run_on_eight_devices
from tests.train._multihost_setup import setup
from tests.train._tiny import TINY


def test_sharded_steps_equal_one_device_and_checkpoints_move_between_meshes():
  results = run_on_eight_devices("tests.train._distributed_worker")
  for mesh, softmax in (("8x1", "sampled"), ("4x2", "full"), ("2x4", "adaptive")):
    got = results["steps"][mesh]
    assert got["softmax"] == softmax
    assert got["moved"] > 1e-3, got  # the parameters did change in 3 steps ...
    assert got["params"] < 1e-5, (mesh, got)  # ... and the same on the mesh and on one device
    assert got["opt_state"] < 1e-5, (mesh, got)
    np.testing.assert_allclose(got["losses"], got["want_losses"], rtol=1e-5)
    assert got["carry_spec"] == "P('data',)"
  # Data parallel only: the table is replicated; with a model axis it is split along V.
  assert results["steps"]["8x1"]["table_spec"] == "P()"
  assert results["steps"]["4x2"]["table_shard_rows"] == 32 // 2
  assert results["steps"]["2x4"]["table_shard_rows"] == 16 // 4  # the last tail, 16 words
  ckpt = results["checkpoint"]
  assert ckpt["loop_step"] == 3
  assert ckpt["differs_from_like"] > 0.1  # the restore overwrote a differently seeded state
  assert ckpt["mesh_2x4"] == 0.0 and ckpt["one_device"] == 0.0
  assert ckpt["mesh_2x4_table_devices"] == 8 and ckpt["mesh_2x4_table_shard_rows"] == 32 // 4
  assert ckpt["mesh_2x4_table_spec"].startswith("P('model'")
  assert ckpt["one_device_devices"] == 1
  cli = results["cli"]
  assert cli["code"] == 0, cli
  assert "mesh data=2 x model=4 (8 cpu devices, 1 process)" in cli["out"]
  assert "| end of training | step 2 |" in cli["out"]
  assert cli["steps"] == [2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_data_parallel_like_one_process_on_the_whole_batch(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                 "PYTHONPATH", "").split(os.pathsep) if p]))
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  out, port = tmp_path / "params.npz", str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-m", "tests.train._multihost_worker", port, "2",
                             str(i), str(out)], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, logs):
    assert p.returncode == 0, err[-3000:]
  got = np.load(out)
  assert int(got["processes"]) == 2 and int(got["devices"]) == 2
  # Each process fed only its own half of the batch rows.
  assert got["rows"].tolist() == [[0, 1], [2, 3]]

  # One process, one device, the whole batch, the plain step.
  model, opt, batches, key, batch_size = setup()
  state = train.init_train_state(model, opt, key, batch_size)
  step = train.make_train_step(model, opt)
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.fold_in(key, i))
    losses.append(float(metrics["loss"]))
  want = jax.tree.leaves(state.params)
  initial = jax.tree.leaves(model.init(key))
  assert max(float(np.max(np.abs(w - i))) for w, i in zip(want, initial)) > 1e-3
  np.testing.assert_allclose(got["losses"], losses, rtol=1e-5)
  for i, leaf in enumerate(want):
    np.testing.assert_allclose(got[f"param_{i}"], leaf, rtol=1e-5, atol=1e-6)


def test_parse_mesh_and_bad_meshes():
  assert _distributed.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
  assert _distributed.parse_mesh("model=2") == {"model": 2}
  for text, match in (("data=4,batch=2", "axis=size pairs"), ("data=0", "positive integers"),
                      ("data=2,data=2", "twice"), ("", "at least one axis")):
    with pytest.raises(ValueError, match=match):
      _distributed.parse_mesh(text)
  with pytest.raises(ValueError, match="needs 8 devices; found 1 .*device_count=8"):
    train.make_mesh(data=4, model=2)
  assert _distributed.mesh_from_flags(None, 4) is None  # one device: unchanged behaviour
  with pytest.raises(ValueError, match="go together"):
    _distributed.mesh_from_flags(None, 4, coordinator="localhost:1234")


def test_configs_that_do_not_split_over_the_model_axis_are_refused():
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  counts = np.arange(64, 0, -1)
  with pytest.raises(ValueError, match="V must be a multiple of 4"):
    _distributed.vocab_parallel_config(ModelConfig(vocab_size=62), counts[:62], mesh)
  with pytest.raises(ValueError, match="hsm-balanced has no vocabulary-parallel form"):
    _distributed.vocab_parallel_config(ModelConfig(vocab_size=64, softmax="hsm-balanced"),
                                       counts, mesh)
  with pytest.raises(ValueError, match=r"clusters \[6, 52\] .* multiples of the model axis"):
    _distributed.vocab_parallel_config(
        ModelConfig(vocab_size=64, softmax="adaptive", cutoffs=(6, 12), div_value=2.0), counts,
        mesh)
  # Automatic cutoffs are moved to multiples of the axis size.
  config = _distributed.vocab_parallel_config(
      ModelConfig(vocab_size=64, softmax="adaptive", div_value=2.0), counts, mesh)
  assert config.cutoffs and all(c % 4 == 0 for c in config.cutoffs), config.cutoffs


def test_cli_mesh_errors_exit_2_with_one_line(capsys):
  for argv, message in ((["--mesh", "data=4,model=2"], "needs 8 devices; found 1"),
                        (["--mesh", "rows=2"], "--mesh must be axis=size pairs"),
                        (["--coordinator", "localhost:1"], "go together")):
    assert _cli.main(TINY + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_the_mesh_is_not_part_of_a_run_so_a_run_resumes_on_another_mesh(tmp_path):
  parser = _cli.build_parser()
  argv = TINY + ["--save", str(tmp_path / "run"), "--mesh", "data=2,model=4"]
  args = parser.parse_args(argv)
  saved = _cli._run_config(args)
  assert "mesh" not in saved and "coordinator" not in saved
  save_config(tmp_path / "run", saved)
  again = TINY + ["--save", str(tmp_path / "run"), "--resume", "--mesh", "data=4,model=2"]
  merged = _cli._merge_resumed(parser.parse_args(again), _cli._explicit(parser, again))
  assert merged.mesh == "data=4,model=2" and merged.resume and merged.batch_size == 4
