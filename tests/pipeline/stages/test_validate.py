import json

from pipeline.stages.validate.stage import gate
from pipeline.stages.validate.targets import agreement


def test_gate_reports_every_failure_with_value_and_limit():
    failures = gate({"perplexity_delta_pct": 0.5, "top1_agreement": 0.9, "greedy_token_agreement": 1.0},
                    {"perplexity_delta_pct": 0.1, "top1_agreement": 0.99, "greedy_token_agreement": 1.0})
    assert failures == ["perplexity_delta_pct = 0.5 > max 0.1", "top1_agreement = 0.9 < min 0.99"]


def test_gate_fails_on_unmeasured_metric_and_nonfinite_logits():
    failures = gate({"nonfinite_logits": 3}, {"kl_divergence": 0.1})
    assert failures[0].startswith("kl_divergence = None (not measured")
    assert "NaN/Inf" in failures[1]


def test_agreement_counts_positions_over_the_longer_sequence():
    assert agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5
    assert agreement([[]], [[]]) == 1.0


def test_report_has_metrics_protocol_and_samples(tiny_run):
    folder = next(tiny_run.glob("02-validate-*"))
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["protocol"]["windows"] == 4 and report["protocol"]["context_length"] == 64
    assert report["metrics"]["perplexity_delta_pct"] < 0.1
    assert report["metrics"]["greedy_token_agreement"] == 1.0
    assert report["metrics"]["batch_greedy_agreement"] == 1.0
    assert report["metrics"]["nonfinite_logits"] == 0
    assert len(report["samples"]) == 4
    md = (folder / "report.md").read_text()
    assert "PASSED" in md and "| perplexity_delta_pct |" in md
