"""Tests of checkpoints: bit-exact resume, atomic saves, retention, bad checkpoints exit 2."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softmax_alts
import train
from tests.train._tiny import TINY, files_snapshot, records
from train import _cli

# 640 training tokens in 4 rows: 20 windows of 8 per epoch (the last one padded). Dropout (the
# per-step keys), Adam (its moments and count), the lr halved at every epoch end (the lr in the
# optimizer state: once before the split at step 25, twice after), the carried state (the split
# is mid-epoch and between two evaluations) and evaluations every 15 steps.
RESUME = TINY + ["--synthetic-tokens", "640", "--dropout", "0.3", "--decay", "epoch",
                 "--decay-after", "0", "--lr-decay", "2", "--eval-interval", "15", "--patience",
                 "0"]


class _State(NamedTuple):
  w: jax.Array
  step: jax.Array


def _state(value, step):
  return _State(jnp.full((3, 2), value, jnp.float32), jnp.asarray(step, jnp.int32))


def _like(argv):
  """A fresh `TrainState` of the run a command line describes."""
  args = _cli.build_parser().parse_args(argv)
  corpus = _cli._load_corpus(args)
  model = _cli.model_from_config(vars(args), corpus.vocab)
  opt = train.optimizer(args.optimizer, args.lr, clip=args.clip or None, sparse_output=True)
  return train.init_train_state(model, opt, jax.random.key(0), args.batch_size)


def _final_state(run_dir, argv):
  """Restores the latest checkpoint of a run into the structure of a fresh state."""
  like = _like(argv)
  checkpoints = train.Checkpoints(run_dir)
  try:
    return checkpoints.restore(like)
  finally:
    checkpoints.close()


def test_resume_is_bit_exact(tmp_path, capsys):
  straight, split = tmp_path / "straight", tmp_path / "split"
  assert _cli.main(RESUME + ["--max-steps", "60", "--save", str(straight)]) == 0
  assert _cli.main(RESUME + ["--max-steps", "25", "--save", str(split)]) == 0
  capsys.readouterr()
  assert _cli.main(RESUME + ["--max-steps", "60", "--save", str(split), "--resume"]) == 0
  out = capsys.readouterr().out
  assert "| resume | step 25" in out
  # The config records the resume: it now holds the new --max-steps, and when it came.
  assert json.loads((straight / "config.json").read_text())["resumes"] == []
  saved = json.loads((split / "config.json").read_text())
  assert saved["config"]["max_steps"] == 60
  assert [(r["step"], r["max_steps"]) for r in saved["resumes"]] == [(25, 60)]
  assert set(saved["resumes"][0]) == {"step"} | set(_cli.RESUMABLE)
  state_a, loop_a = _final_state(straight, RESUME)
  state_b, loop_b = _final_state(split, RESUME)
  assert int(state_a.step) == int(state_b.step) == 60
  # Parameters, optimizer state (moments, count, decayed learning rate) and carried state.
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert train.learning_rate(state_a) == pytest.approx(5e-3 / 8)  # epoch ends 20, 40, 60
  assert loop_a["best_valid"] == loop_b["best_valid"]
  assert loop_a["evals_since_best"] == loop_b["evals_since_best"]
  # The logs agree on every evaluation after the split, and on the test perplexity.
  valid_a = [(r["step"], r["valid_ppl"]) for r in records(straight, "valid") if r["step"] > 25]
  valid_b = [(r["step"], r["valid_ppl"]) for r in records(split, "valid") if r["step"] > 25]
  assert [s for s, _ in valid_a] == [30, 40, 45, 60]
  assert valid_a == valid_b
  assert records(straight, "test")[0]["test_ppl"] == records(split, "test")[0]["test_ppl"]


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  checkpoints = train.Checkpoints(tmp_path, keep=3)
  checkpoints.save(_state(1.0, 1), {"step": 1}, valid_ppl=9.0)
  rename = atomicity.async_path.rename
  seen = []

  async def fail_at_commit(source, target, *args, **kwargs):
    # Every file of step 2 is written; the save dies at its commit, the rename of the step.
    if pathlib.Path(target).name == "2":
      seen.append(sorted(p.name for p in pathlib.Path(source).iterdir()))
      raise OSError("No space left on device")
    return await rename(source, target, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(atomicity.async_path, "rename", fail_at_commit)
    with pytest.raises(OSError, match="No space"):
      checkpoints.save(_state(2.0, 2), {"step": 2}, valid_ppl=8.0)
  assert seen and {"state", "loop"} <= set(seen[0])
  # The half-written folder of step 2 is gone; step 1 is untouched.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  reopened = train.Checkpoints(tmp_path, keep=3)
  assert reopened.steps() == [1]
  state, loop = reopened.restore(_state(0.0, 0))
  np.testing.assert_array_equal(state.w, np.full((3, 2), 1.0))
  assert loop == {"step": 1}
  reopened.save(_state(3.0, 2), {"step": 2}, valid_ppl=8.0)
  assert reopened.steps() == [1, 2]
  with pytest.raises(ValueError, match="never overwritten"):
    reopened.save(_state(4.0, 2), {"step": 2})


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path):
  # A child process saves step 1, then dies (os._exit: no cleanup, no exception handling) while
  # writing step 2.
  script = textwrap.dedent("""
      import os, sys
      from typing import NamedTuple
      import jax
      import jax.numpy as jnp
      from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
      import train
      class State(NamedTuple):
        w: jax.Array
        step: jax.Array
      checkpoints = train.Checkpoints(sys.argv[1])
      checkpoints.save(State(jnp.ones((3, 2)), jnp.asarray(1, jnp.int32)), {"step": 1},
                       valid_ppl=5.0)
      async def die(*args, **kwargs):
        os._exit(9)
      handler.JsonCheckpointHandler.async_save = die
      checkpoints.save(State(jnp.zeros((3, 2)), jnp.asarray(2, jnp.int32)), {"step": 2},
                       valid_ppl=4.0)
  """)
  done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 9, done.stderr
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert names[0] == "1" and len(names) == 2 and "tmp" in names[1]
  checkpoints = train.Checkpoints(tmp_path)
  assert checkpoints.steps() == [1] and checkpoints.best_step() == 1
  state, loop = checkpoints.restore(_state(0.0, 0))
  np.testing.assert_array_equal(state.w, np.ones((3, 2)))
  assert loop == {"step": 1}
  # Opening the folder deleted the half-written step; a new save of step 2 works.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  checkpoints.save(_state(2.0, 2), {"step": 2})
  assert checkpoints.steps() == [1, 2]


def test_keeps_the_last_k_and_the_best(tmp_path):
  checkpoints = train.Checkpoints(tmp_path, keep=2)
  for step, ppl in [(1, 50.0), (2, 30.0), (3, 40.0), (4, 45.0), (5, None), (6, 60.0)]:
    checkpoints.save(_state(float(step), step), {"step": step}, valid_ppl=ppl)
  assert checkpoints.steps() == [2, 5, 6]
  assert checkpoints.best_step() == 2
  assert checkpoints.metric(2) == 30.0 and checkpoints.metric(5) is None
  state, _ = checkpoints.restore(_state(0.0, 0), 2)
  np.testing.assert_array_equal(state.w, np.full((3, 2), 2.0))


def _trained_run(tmp_path):
  run = tmp_path / "run"
  assert _cli.main(TINY + ["--max-steps", "6", "--eval-interval", "3", "--save", str(run)]) == 0
  return run


def test_resuming_with_another_config_exits_2_and_writes_nothing(tmp_path, capsys):
  run = _trained_run(tmp_path)
  before = files_snapshot(run)
  capsys.readouterr()
  code = _cli.main(TINY + ["--nhid", "24", "--max-steps", "12", "--save", str(run), "--resume"])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "another config" in err and "nhid: 16 -> 24" in err
  # A config file that no longer matches its checkpoints: the arrays tell.
  config_path = run / "config.json"
  data = json.loads(config_path.read_text())
  data["config"]["nhid"] = 24
  config_path.write_text(json.dumps(data))
  before = files_snapshot(run)
  code = _cli.main(["--save", str(run), "--resume", "--quiet"])
  err = capsys.readouterr().err
  assert code == 2 and "another config" in err and "(4,16)" in err.replace(" ", "")
  assert "(4,24)" in err.replace(" ", "")
  assert files_snapshot(run) == before


def _checkpoint_steps(run):
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir())


def _resume(run, capsys, *extra):
  code = _cli.main(TINY + ["--save", str(run), "--resume"] + list(extra))
  out, err = capsys.readouterr()
  return code, out, err


def test_relative_run_folders_save_restore_and_read(tmp_path, monkeypatch):
  # orbax wants absolute paths; a run folder given relative to the working directory works.
  monkeypatch.chdir(tmp_path)
  checkpoints = train.Checkpoints("runs/a", keep=2)
  checkpoints.save(_state(1.0, 1), {"step": 1}, valid_ppl=9.0)
  checkpoints.save(_state(2.0, 2), {"step": 2}, valid_ppl=8.0)
  checkpoints.close()
  reader = train.Checkpoints("runs/a", read_only=True)
  assert reader.steps() == [1, 2] and reader.best_step() == 2
  state, loop = reader.restore(_state(0.0, 0), 1)
  np.testing.assert_array_equal(state.w, np.full((3, 2), 1.0))
  assert loop == {"step": 1}
  assert reader.restore_intact(_state(0.0, 0))[0] == 2
  reader.close()


def test_a_resumed_run_whose_best_is_its_latest_checkpoint_ends_cleanly(tmp_path, capsys):
  # The latest checkpoint is the best, and no later evaluation beats it: the best parameters
  # must survive the steps, which donate the state's buffers.
  run = _trained_run(tmp_path)
  metrics = run / "checkpoints" / "6" / "metrics" / "metrics"
  assert json.loads(metrics.read_text())["valid_ppl"] > 1
  metrics.write_text(json.dumps({"valid_ppl": 1.0}))
  code, out, err = _resume(run, capsys, "--max-steps", "9", "--eval-interval", "3")
  assert code == 0, err
  assert "| resume | step 6" in out
  end = out.strip().splitlines()[-1]
  assert end.startswith("| end of training | step 9 | test ppl ") and "valid ppl 1.000" in end


def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_never_lost(tmp_path, capsys):
  from train import generate
  run = _trained_run(tmp_path)  # checkpoints of steps 3 and 6
  assert _checkpoint_steps(run) == [3, 6]
  # The metrics of the oldest emptied: the latest is used; the damaged one is set aside.
  oldest = run / "checkpoints" / "3"
  (oldest / "metrics" / "metrics").write_text("")
  oldest_files = files_snapshot(oldest)
  capsys.readouterr()
  assert generate.main(["--checkpoint", str(run), "--step", "6", "--words", "3"]) == 0
  out, err = capsys.readouterr()
  assert len(out.split()) == 3
  assert f"`{oldest}/metrics/metrics` cannot be read" in err and "Skipped." in err
  assert files_snapshot(run / "checkpoints" / "3") == oldest_files  # generate only reads
  code, out, err = _resume(run, capsys, "--max-steps", "9", "--eval-interval", "3")
  assert code == 0, err
  assert "| resume | step 6" in out and "| end of training | step 9 | test ppl" in out
  assert err.startswith("warning: ") and err.count("\n") == 1
  assert f"`{oldest}/metrics/metrics` cannot be read" in err
  assert f"set aside in `{run}/damaged/3`" in err
  assert files_snapshot(run / "damaged" / "3") == oldest_files
  assert _checkpoint_steps(run) == [6, 9]
  # Every file of the latest emptied: the one before it is used, and training goes on past it.
  latest = run / "checkpoints" / "9"
  for path in latest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  code, out, err = _resume(run, capsys, "--max-steps", "12", "--eval-interval", "3")
  assert code == 0, err
  assert "| resume | step 6" in out and "| end of training | step 12 | test ppl" in out
  assert f"the checkpoint `{latest}` is damaged" in err and f"`{run}/damaged/9`" in err
  assert _checkpoint_steps(run) == [6, 9, 12]
  assert sorted(p.name for p in (run / "damaged").iterdir()) == ["3", "9"]


def _garble_arrays(step_dir):
  data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert data_files
  for path in data_files:
    path.write_bytes(b"\x00garbage" * 3)


def test_a_checkpoint_with_garbled_arrays_is_skipped(tmp_path, capsys):
  run = _trained_run(tmp_path)
  _garble_arrays(run / "checkpoints" / "6")
  garbled = files_snapshot(run / "checkpoints" / "6")
  warnings = []
  reader = train.Checkpoints(run, read_only=True, warn=warnings.append)
  assert reader.steps() == [3] and list(reader.damaged) == [6] and len(warnings) == 1
  with pytest.raises(train.CorruptCheckpoint, match="checkpoints/6` is damaged") as caught:
    reader.restore(_like(TINY), 6)
  assert caught.value.step == 6 and str(caught.value) in warnings[0]
  reader.close()
  code, out, err = _resume(run, capsys, "--max-steps", "6")
  assert code == 0, err
  assert "| resume | step 3" in out
  assert f"the checkpoint `{run}/checkpoints/6` is damaged" in err and "tensorstore_spec" not in err
  assert files_snapshot(run / "damaged" / "6") == garbled
  # With no intact checkpoint left, the resume ends with one error line; nothing is lost.
  _garble_arrays(run / "checkpoints" / "3")
  _garble_arrays(run / "checkpoints" / "6")
  before = files_snapshot(run)
  code, out, err = _resume(run, capsys, "--max-steps", "9")
  assert code == 2
  lines = err.strip().splitlines()
  assert [line.split(":")[0] for line in lines] == ["warning", "warning", "error"]
  assert "holds no intact checkpoint" in lines[-1] and "| data |" not in out
  after = files_snapshot(run)
  assert sorted(before.values()) == sorted(after.values())  # moved aside, never deleted


def test_no_traceback_after_a_damaged_checkpoint_from_the_shell(tmp_path):
  # A failed read leaves orbax's I/O callbacks to run after its event loop closed; they must not
  # print tracebacks (at any time, at exit included).
  run = _trained_run(tmp_path)
  _garble_arrays(run / "checkpoints" / "6")
  (run / "checkpoints" / "3" / "state" / "manifest.ocdbt").unlink()
  done = subprocess.run([sys.executable, "-m", "train.generate", "--checkpoint", str(run)],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and done.stdout == ""
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 3, done.stderr
  assert lines[0].startswith("warning: the checkpoint") and lines[1].startswith("warning: ")
  assert lines[2] == f"error: `{run}` holds no intact checkpoint."


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed_or_restarted(
    tmp_path, capsys, monkeypatch):
  run = tmp_path / "run"
  with monkeypatch.context() as patch:
    def interrupted(*args, **kwargs):
      raise KeyboardInterrupt
    patch.setattr(train.Checkpoints, "save", interrupted)
    assert _cli.main(TINY + ["--max-steps", "4", "--eval-interval", "2", "--save",
                             str(run)]) == 130
  capsys.readouterr()
  assert (run / "config.json").is_file() and not any((run / "checkpoints").iterdir())
  from train import generate
  assert generate.main(["--checkpoint", str(run)]) == 2
  assert capsys.readouterr().err == f"error: `{run}` holds no checkpoint yet.\n"
  code, out, err = _resume(run, capsys, "--max-steps", "4")
  assert code == 0, err
  assert "holds no checkpoint yet" in out and "starting it from step 0" in out
  assert "| end of training | step 4 |" in out
  assert [r["step"] for r in records(run, "valid")] == [0, 2, 4]
  # Without --resume: started again, with a note.
  shutil.rmtree(run / "checkpoints")
  code, out, err = _main_out(TINY + ["--max-steps", "2", "--save", str(run)], capsys)
  assert code == 0, err
  assert "stopped before its first checkpoint: starting it again" in out
  assert _checkpoint_steps(run) == [2]


def _main_out(argv, capsys):
  code = _cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_a_corrupt_config_or_an_existing_run_exits_2(tmp_path, capsys):
  run = _trained_run(tmp_path)
  before = files_snapshot(run)
  capsys.readouterr()
  # Starting a new run over an existing one is refused: nothing is overwritten.
  assert _cli.main(TINY + ["--max-steps", "3", "--save", str(run)]) == 2
  assert "already holds a run" in capsys.readouterr().err
  assert files_snapshot(run) == before
  (run / "config.json").write_text("{not json")
  assert _cli.main(TINY + ["--save", str(run), "--resume"]) == 2
  assert "corrupt" in capsys.readouterr().err
  assert _cli.main(TINY + ["--save", str(tmp_path / "nothing"), "--resume"]) == 2
  assert "holds no run" in capsys.readouterr().err
  assert not (tmp_path / "nothing").exists()


def test_run_folder_holds_config_vocab_log_and_plot(tmp_path):
  run = _trained_run(tmp_path)
  config = json.loads((run / "config.json").read_text())["config"]
  assert config["nhid"] == 16 and config["model"]["vocab_size"] == 31
  vocab = train.Vocab.load(run / "vocab.json")
  assert len(vocab) == 31
  events = [r["event"] for r in records(run)]
  assert events.count("valid") == 3 and events.count("test") == 1  # steps 0, 3, 6
  train_records = [r for r in records(run) if r["event"] == "train"]
  assert [r["step"] for r in train_records] == [5, 6]
  assert all(r["train_ppl"] > 1 and r["tokens_per_s"] > 0 and r["lr"] > 0
             for r in train_records)


def test_the_logged_speed_leaves_out_the_compiling_first_step(tmp_path):
  run = tmp_path / "run"
  assert _cli.main(TINY + ["--max-steps", "3", "--log-interval", "1", "--save", str(run)]) == 0
  # The first step compiles: it is not timed, so its record has no rate; the others have one.
  rates = [r["tokens_per_s"] for r in records(run, "train")]
  assert rates[0] is None and len(rates) == 3 and all(r > 0 for r in rates[1:])
  assert (run / "metrics.png").stat().st_size > 1000


@pytest.mark.parametrize("softmax, tied", [("sampled", True), ("adaptive", False),
                                           ("hsm-huffman", False)])
def test_train_states_round_trip_exactly(softmax, tied, tmp_path):
  # The row-sparse optimizer state (over a [V, H] table and over a tree's [V-1, H] nodes), a
  # tied model (no embedding array) and an adaptive softmax (no head bias, tuples of tails) all
  # restore to the same tree, leaf for leaf.
  corpus = train.synthetic_corpus(train_length=500, valid_length=50, test_length=50,
                                  vocab_size=20)
  model = train.language_model(train.ModelConfig(len(corpus.vocab), emsize=8, nhid=8,
                                                 softmax=softmax, tied=tied, num_samples=4,
                                                 div_value=2.0),
                               corpus.vocab.counts)
  opt = train.optimizer("adam", 0.01, sparse_output=True)
  state = train.init_train_state(model, opt, jax.random.key(1), 2)
  state = train.set_learning_rate(state, 0.125)._replace(step=jnp.asarray(7, jnp.int32))
  checkpoints = train.Checkpoints(tmp_path)
  checkpoints.save(state, {"step": 7}, valid_ppl=3.0)
  like = train.init_train_state(model, opt, jax.random.key(2), 2)
  restored, loop = checkpoints.restore(like)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored.opt_state, train.SparseOptState) == (softmax != "adaptive")
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert train.learning_rate(restored) == 0.125 and loop == {"step": 7}


def test_a_dense_optimizer_state_restores_into_the_row_sparse_layout(tmp_path):
  # A hierarchical run saved with the dense path's optimizer state (as before the hierarchical
  # softmax trained row-sparsely) resumes row-sparsely: the nodes' moments become the row-wise
  # state, the rest's stay, the count and the learning rate go to both.
  corpus = train.synthetic_corpus(train_length=500, valid_length=50, test_length=50,
                                  vocab_size=20)
  model = train.language_model(train.ModelConfig(len(corpus.vocab), emsize=8, nhid=8,
                                                 softmax="hsm-huffman"), corpus.vocab.counts)
  dense = train.init_train_state(model, train.optimizer("adam", 0.01, sparse_output=False),
                                 jax.random.key(1), 2)
  leaves, treedef = jax.tree.flatten(dense)
  dense = jax.tree.unflatten(treedef, [jnp.full_like(x, i + 1) for i, x in enumerate(leaves)])
  checkpoints = train.Checkpoints(tmp_path)
  checkpoints.save(dense, {"step": int(dense.step)})
  sparse_opt = train.optimizer("adam", 0.01, sparse_output=True)
  like = train.init_train_state(model, sparse_opt, jax.random.key(2), 2)
  restored, _ = checkpoints.restore(like)
  assert jax.tree.structure(restored) == jax.tree.structure(like)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(dense.params)):
    np.testing.assert_array_equal(a, b)
  (adam, _), lr = dense.opt_state.inner_state, dense.opt_state.hyperparams["learning_rate"]
  for part, moments in ((restored.opt_state.rows, lambda m: m.output),
                        (restored.opt_state.dense, lambda m: m._replace(output=None))):
    (got, _), got_lr = part.inner_state, part.hyperparams["learning_rate"]
    for field in ("mu", "nu"):
      for a, b in zip(jax.tree.leaves(getattr(got, field)),
                      jax.tree.leaves(moments(getattr(adam, field)))):
        np.testing.assert_array_equal(a, b)
    assert int(got.count) == int(adam.count) and float(got_lr) == float(lr)
  assert isinstance(restored.opt_state.rows.inner_state[0].mu, softmax_alts.HierarchicalParams)
  assert train.learning_rate(restored) == float(lr)


def test_the_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  rows = [{"event": "train", "step": 1, "wall_time": 0.5, "train_ppl": 30.0},
          {"event": "valid", "step": 1, "wall_time": 0.6, "valid_ppl": 28.0}]
  assert train.plot_metrics(rows, tmp_path / "plot.png") is False
  assert "matplotlib is not installed" in capsys.readouterr().err
  assert not (tmp_path / "plot.png").exists()
