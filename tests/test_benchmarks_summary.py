"""The benchmarks' summary keeps the rows of suites not rerun; the precision suite reads a run."""

import pytest

from benchmarks import _harness as h
from benchmarks import _precision


def test_a_run_keeps_the_other_suites_rows_of_the_summary(tmp_path, monkeypatch):
  monkeypatch.setitem(h.SUITES, "first", lambda ctx: [h.SummaryRow("first", "speed", "2.0x")])
  monkeypatch.setitem(h.SUITES, "second", lambda ctx: [h.SummaryRow("second", "ppl", "20.9")])
  h.run(suites=["first", "second"], quick=True, threads=1, seed=0, repeats=None, out=str(tmp_path))
  monkeypatch.setitem(h.SUITES, "first", lambda ctx: [h.SummaryRow("first", "speed", "3.0x")])
  h.run(suites=["first"], quick=True, threads=1, seed=0, repeats=None, out=str(tmp_path))
  rows = h._summary_rows(tmp_path / "summary.md")
  got = [(r.suite, r.measurement, r.result) for r in rows if r.measurement != "suite wall time"]
  assert got == [("first", "speed", "3.0x"), ("second", "ppl", "20.9")]
  assert [r.suite for r in rows if r.measurement == "suite wall time"] == ["first", "second"]


def test_the_precision_suite_reads_the_end_of_a_run():
  line = ("| end of training | step 1788 | test ppl 20.859 | valid ppl 20.454 | best possible "
          "20.438 | ratio 1.0206 | unigram 81.210 | 37.6 s")
  assert _precision.parse_end("| model | ...\n" + line + "\n") == {
      "steps": 1788, "test_ppl": 20.859, "valid_ppl": 20.454, "best_possible": 20.438,
      "seconds": 37.6}
  with pytest.raises(ValueError, match="no end-of-training line"):
    _precision.parse_end("error: something\n")
