"""The README's `train` commands run as written, relative paths and all, in a fresh folder.

Every `python -m train` command of the README's `train` section is run from an empty folder (a
fresh clone's working directory), in order, with a tiny size appended (small synthetic corpus,
small model, a few steps); `path/to/wikitext-2` is a small corpus folder made there.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--synthetic-tokens", "800", "--synthetic-vocab", "50", "--emsize", "16", "--nhid", "16",
        "--nlayers", "1", "--batch-size", "4", "--bptt", "5", "--eval-batch-size", "2",
        "--quiet"]


def readme_train_commands() -> list[str]:
  """The `python -m train...` commands of the README's `train` section, in order."""
  text = (REPO / "README.md").read_text(encoding="utf-8")
  section = text.split("\n## `train`\n", 1)[1].split("\n## ", 1)[0]
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith("python -m train"):
        commands.append(line)
  return commands


def _corpus(folder: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(40)]
  folder.mkdir(parents=True)
  for name, lines in (("train.txt", 60), ("valid.txt", 60), ("test.txt", 20)):
    text = "\n".join(" ".join(rng.choice(words, size=9)) for _ in range(lines))
    (folder / name).write_text(text + "\n", encoding="utf-8")


def test_the_readme_train_commands_run_as_written_in_a_fresh_folder(tmp_path):
  commands = readme_train_commands()
  assert len(commands) >= 6 and any("--resume" in c for c in commands)
  assert any(c.startswith("python -m train.generate") for c in commands)
  _corpus(tmp_path / "path" / "to" / "wikitext-2")
  # Values, not speed, are checked: XLA's lighter optimisation compiles faster, as in-process.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  steps = {}
  for command in commands:
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"]
    module, flags = argv[2], argv[3:]
    if module == "train":
      folder = flags[flags.index("--save") + 1] if "--save" in flags else None
      steps[folder] = steps.get(folder, 0) + 3  # a resume goes 3 steps further
      flags = flags + TINY + ["--max-steps", str(steps[folder])]
    done = subprocess.run([sys.executable, "-m", module] + flags, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stderr)
    assert "Traceback" not in done.stderr and "warning" not in done.stderr, command
    out = done.stdout
    if module == "train":
      end = out.strip().splitlines()[-1]
      assert re.match(rf"\| end of training \| step {steps.get(folder)} \| test ppl [0-9.]+ ",
                      end), (command, out)
      if "--resume" in flags:
        assert f"| resume | step {steps[folder] - 3} from `{folder}`" in out
    else:
      words = int(flags[flags.index("--words") + 1])
      lines = out.strip().splitlines()
      beams = int(flags[flags.index("--beam") + 1]) if "--beam" in flags else 1
      assert len(lines) == beams, (command, out)
      assert all(len(re.sub(r"^\[-?[0-9.]+\] ", "", line).split()) <= words for line in lines)
      assert all(re.fullmatch(r"(\[-?[0-9.]+\] )?((w\d+|<unk>|<eos>) ?)+", line)
                 for line in lines), out
  assert (tmp_path / "runs" / "a" / "checkpoints").is_dir()
