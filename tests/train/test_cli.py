"""Tests of `python -m train`: every output layer trains, bad input exits 2, the final report."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import train
from tests.train._tiny import TINY, records, valid_lines
from train import _cli
from train._model import SOFTMAXES


def _main(argv, capsys):
  code = _cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("softmax", SOFTMAXES)
def test_every_softmax_trains_and_its_exact_perplexity_falls(softmax, capsys):
  steps = 60
  extra = []
  if softmax in ("sampled", "nce"):
    extra = ["--num-samples", "8"]
  elif softmax == "ns":
    # Negative sampling fits log(p / (k q)), not log p: the exact softmax of its scores is p only
    # when q is uniform, and it gets there more slowly.
    extra, steps = ["--num-samples", "8", "--sampler", "uniform"], 90
  code, out, err = _main(TINY + ["--softmax", softmax, "--max-steps", str(steps),
                                 "--eval-interval", "30", "--patience", "0"] + extra, capsys)
  assert code == 0, err
  valid = valid_lines(out)
  assert [step for step, _ in valid] == list(range(0, steps + 1, 30))
  ppl = [p for _, p in valid]
  # Exact perplexities (the full normalized distribution): about V = 31 untrained, then lower.
  assert 20 < ppl[0] < 45, ppl
  assert ppl[-1] < 0.98 * ppl[0], ppl
  end = [line for line in out.splitlines() if line.startswith("| end of training")]
  assert len(end) == 1
  test_ppl = float(re.search(r"test ppl ([0-9.]+)", end[0]).group(1))
  assert 1.0 < test_ppl < 0.98 * ppl[0]


def test_help_documents_every_flag_with_its_default(capsys):
  code, out, _ = _main(["--help"], capsys)
  assert code == 0
  parser = _cli.build_parser()
  flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
  assert len(flags) > 40
  text = " ".join(out.split())
  for action in flags:
    assert action.help, action.dest
    assert action.option_strings[0] in out
  # ArgumentDefaultsHelpFormatter appends "(default: ...)" to every documented flag.
  assert text.count("(default:") == len(flags)
  for snippet in ("--softmax", "(default: full)", "--lr", "(default: 0.005)", "--bptt",
                  "(default: 35)", "--data", "(default: synthetic)", "--cell",
                  "(default: lstm)"):
    assert snippet in text


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


@pytest.fixture
def corpus_dir(tmp_path):
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(12)]
  lines = [" ".join(rng.choice(words, size=8)) for _ in range(120)]
  folder = tmp_path / "corpus"
  _write(folder / "train.txt", "\n".join(lines[:100]) + "\n")
  _write(folder / "valid.txt", "\n".join(lines[100:110]) + "\n")
  _write(folder / "test.txt", "\n".join(lines[110:]) + "\n")
  return folder


def _bad_inputs(tmp_path, corpus_dir):
  empty = tmp_path / "empty"
  _write(empty / "train.txt", "")
  _write(empty / "valid.txt", "a b\n")
  _write(empty / "test.txt", "a b\n")
  one_type = tmp_path / "one_type"
  for name in ("train.txt", "valid.txt", "test.txt"):
    _write(one_type / name, "the the the\nthe\n")
  lacking = tmp_path / "lacking"
  _write(lacking / "train.txt", "a b c\n")
  _write(lacking / "test.txt", "a b c\n")
  small = TINY  # V = 31
  return [
      (["--data", str(tmp_path / "absent")], "does not exist"),
      (["--max-vocab", "100"], "--max-vocab needs a corpus folder"),
      (["--data", str(lacking)], "lacks the split file(s) valid.txt"),
      # Messages name the flags, not read_corpus's arguments.
      (["--data", str(lacking)], "e.g. --train-split train.txt --eval-split test.txt"),
      (["--data", str(corpus_dir), "--eval-split", "nope.txt", "--train-split", "train.txt"],
       "--eval-split nope.txt: no such split file"),
      (["--data", str(corpus_dir), "--eval-split", "test.txt"],
       "--train-split is required when a split is named"),
      (["--max-vocab", "1"], "--max-vocab: must be at least 2 (<unk> and <eos> are always kept)"),
      (["--data", str(empty)], "is empty"),
      (["--data", str(one_type)], "at least two"),
      (["--softmax", "bogus"], "invalid choice: 'bogus'"),
      (["--emsize", "0"], "--emsize: must be a positive integer; got 0"),
      (["--nhid", "-3"], "--nhid: must be a positive integer; got -3"),
      (["--batch-size", "0"], "--batch-size"),
      (["--bptt", "-1"], "--bptt"),
      (["--lr", "0"], "--lr"),
      (["--dropout", "1"], "--dropout"),
      (["--cutoffs", "a,b"], "--cutoffs"),
      (small + ["--softmax", "adaptive", "--cutoffs", "10,40"], "cutoffs"),
      (small + ["--softmax", "adaptive", "--cutoffs", "20,10"], "cutoffs"),
      (small + ["--softmax", "dsoftmax", "--bands", "20:8,5:8"], "sum to V = 31"),
      (small + ["--softmax", "dsoftmax", "--bands", "20:8,11:4"], "sum to H = 16"),
      (small + ["--softmax", "class", "--classes", "40"], "classes"),
      (small + ["--tied", "--softmax", "hsm-huffman"], "tied"),
      (small + ["--tied", "--emsize", "8"], "emsize"),
      (small + ["--proj", "8", "--cell", "gru"], "--proj needs --cell lstm"),
      (small + ["--batch-size", "2000"], "too few for --batch-size 2000"),
      (small + ["--level", "char"], "--level char needs a text corpus"),
      (small + ["--reset-at-eos"], "--reset-at-eos needs a word-level corpus"),
      (["--data", str(corpus_dir / "train.txt"), "--level", "char", "--reset-at-eos"],
       "--reset-at-eos needs a word-level corpus"),
      (small + ["--resume"], "--resume needs --save"),
      (small + ["--save", str(corpus_dir / "train.txt")], "is not a folder"),
  ]


def test_bad_input_exits_2_with_one_error_line_before_training(tmp_path, corpus_dir, capsys):
  for argv, message in _bad_inputs(tmp_path, corpus_dir):
    code, out, err = _main(argv, capsys)
    assert code == 2, (argv, err)
    assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert message in err, (argv, err)
    assert "| data |" not in out and "| eval |" not in out, argv
    assert "_split" not in err and "max_size" not in err, (argv, err)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/corpus"], "does not exist"),
    (["--emsize", "0"], "must be a positive integer"),
    (["--softmax", "bogus"], "invalid choice"),
])
def test_bad_input_from_the_shell_has_no_traceback(argv, message):
  done = subprocess.run([sys.executable, "-m", "train"] + argv, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
  assert done.stdout == ""


def test_text_corpora_train_word_and_char_level(corpus_dir, tmp_path, capsys):
  small = ["--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "6",
           "--eval-batch-size", "2", "--quiet"]
  code, out, err = _main(["--data", str(corpus_dir), "--max-steps", "8"] + small, capsys)
  assert code == 0, err
  assert "V 14" in out  # 12 words, <eos> and <unk>
  assert re.search(r"\| end of training \| step 8 \| test ppl [0-9.]+ \| valid ppl", out)
  assert "best possible" not in out
  # Named splits without a validation split: the tail of the training split is held out.
  code, out, err = _main(["--data", str(corpus_dir), "--train-split", "train.txt",
                          "--eval-split", "test.txt", "--max-steps", "4"] + small, capsys)
  assert code == 0, err
  assert "no validation split: the last 5% of the training tokens" in out
  text = tmp_path / "shakespeare.txt"
  text.write_text("to be or not to be, that is the question.\n" * 40)
  code, out, err = _main(["--data", str(text), "--level", "char", "--max-steps", "4"] + small,
                         capsys)
  assert code == 0, err
  assert "(char)" in out and "test ppl" in out


def test_the_synthetic_run_reports_test_best_ratio_and_unigram(capsys):
  loud = [a for a in TINY if a != "--quiet"]
  code, out, err = _main(loud + ["--max-steps", "30"], capsys)
  assert code == 0, err
  # Not a TTY: no bar, a line every --log-interval (5) steps instead.
  progress = [line for line in out.splitlines() if line.startswith("| epoch")]
  assert len(progress) == 6 and "step     30/30" in progress[-1] and "tok/s" in progress[-1]
  end = out.strip().splitlines()[-1]
  match = re.search(r"test ppl ([0-9.]+) \| valid ppl [0-9.]+ \| best possible ([0-9.]+) \| "
                    r"ratio ([0-9.]+) \| unigram ([0-9.]+)", end)
  assert match, end
  test_ppl, best, ratio, unigram = (float(g) for g in match.groups())
  corpus = train.synthetic_corpus(0, train_length=3000, valid_length=300, test_length=300,
                                  vocab_size=30)
  assert best == pytest.approx(corpus.best_perplexity, abs=1e-3)
  assert unigram == pytest.approx(corpus.unigram_perplexity, abs=1e-3)
  assert ratio == pytest.approx(test_ppl / best, abs=1e-3)
  assert best < test_ppl


def test_quiet_does_what_its_help_says(capsys):
  # Not a TTY: without --quiet a line every --log-interval steps, with it none; the help says so.
  _, help_text, _ = _main(["--help"], capsys)
  help_text = " ".join(help_text.split())
  assert ("--quiet no progress bar and no periodic lines (without it: a progress bar when stderr "
          "is a terminal, else a line on stdout every --log-interval steps)") in help_text
  for quiet, lines in ((True, 0), (False, 2)):
    argv = [a for a in TINY if a != "--quiet"] + ["--max-steps", "10"] + (["--quiet"] * quiet)
    code, out, err = _main(argv, capsys)
    assert code == 0, err
    progress = [line for line in out.splitlines() if line.startswith("| epoch")]
    assert len(progress) == lines, out
    assert "| end of training | step 10 |" in out and err == ""


def _lr_at_evaluations(run):
  """`(valid ppl, lr in force when it was measured)` of every evaluation after step 0."""
  return [(r["valid_ppl"], r["lr"]) for r in records(run, "valid") if r["step"] > 0]


def test_the_pytorch_recipe_anneals_on_a_plateau_only_and_never_stops_early(tmp_path, capsys):
  # PyTorch's word_language_model main.py: lr 20, then `lr /= 4` after every evaluation whose
  # validation loss is not below the best so far; no early stop. Tiny sizes, evaluations every
  # 20 steps besides the epoch ends (94 windows each), so that both cases occur.
  run = tmp_path / "run"
  tiny = ["--synthetic-tokens", "3000", "--synthetic-vocab", "30", "--emsize", "16", "--nhid",
          "16", "--batch-size", "4", "--bptt", "8", "--eval-batch-size", "4", "--quiet"]
  code, out, err = _main(["--recipe", "pytorch", "--epochs", "2", "--eval-interval", "20",
                          "--save", str(run)] + tiny, capsys)
  assert code == 0, err
  assert "| model | lstm 2x16, emsize 16, dropout 0.2, softmax full" in out
  assert "sgd lr 20, clip 0.25" in out and "| end of training | step 188 |" in out
  config = json.loads((run / "config.json").read_text())["config"]
  assert {k: config[k] for k in ("decay", "lr_decay", "patience", "init")} == {
      "decay": "plateau", "lr_decay": 4.0, "patience": 0, "init": "pytorch"}
  seen = _lr_at_evaluations(run)
  lr, best, expected, decays = 20.0, None, [], 0
  for ppl, _ in seen:  # main.py's rule, written out
    expected.append(lr)
    if best is None or ppl < best:
      best = ppl
    else:
      lr, decays = lr / 4.0, decays + 1
  assert [lr for _, lr in seen] == pytest.approx(expected, rel=1e-6)
  assert 0 < decays < len(seen) - 1, seen  # both branches of the rule were taken

  # Ours, --decay epoch: divided by --lr-decay at each epoch end from --decay-after on, whatever
  # the validation perplexity does.
  run = tmp_path / "epoch"
  code, out, err = _main(TINY + ["--decay", "epoch", "--decay-after", "1", "--lr-decay", "2",
                                 "--epochs", "3", "--eval-interval", "40", "--patience", "0",
                                 "--save", str(run)], capsys)
  assert code == 0, err
  steps = [r["step"] for r in records(run, "valid") if r["step"] > 0]
  assert steps == [40, 80, 94, 120, 160, 188, 200, 240, 280, 282]
  want = [5e-3 / 2 ** ((s - 1) // 94) for s in steps]  # the epoch ends before the step
  assert [lr for _, lr in _lr_at_evaluations(run)] == pytest.approx(want, rel=1e-6)


def test_generate_samples_and_beam_searches_from_a_run(tmp_path, capsys):
  from train import generate
  run = tmp_path / "run"
  assert _cli.main(TINY + ["--max-steps", "6", "--eval-interval", "3", "--save", str(run)]) == 0
  capsys.readouterr()
  assert generate.main(["--checkpoint", str(run), "--words", "12", "--temperature", "0.7",
                        "--top-k", "5", "--seed", "3"]) == 0
  text = capsys.readouterr().out.split()
  assert len(text) == 12 and all(re.fullmatch(r"w\d+|<unk>", w) for w in text)
  assert generate.main(["--checkpoint", str(run), "--words", "5", "--beam", "3", "--prompt",
                        "w1 w2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  scores = [float(re.match(r"\[(-?[0-9.]+)\]", line).group(1)) for line in lines]
  assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
  assert all(len(line.split()) == 6 for line in lines)  # the score, then 5 words
  assert generate.main(["--checkpoint", str(tmp_path / "absent")]) == 2
  assert "not a run folder" in capsys.readouterr().err
  assert generate.main(["--checkpoint", str(run), "--top-k", "40"]) == 2
  assert capsys.readouterr().err == ("error: --top-k 40 is larger than the run's vocabulary "
                                     "(31 tokens).\n")
