"""The lambda-transfer study: its digit variants are sound test cases, and the study runs end to end."""

from __future__ import annotations

import pytest
import torch

from reference.studies import STUDIES
from reference.studies.digit_data import DigitJudge
from reference.studies.lambda_transfer import (
    REPORT_NAME,
    RULES,
    VARIANTS,
    _embedder_spec,
    format_transfer_table,
    run_lambda_transfer,
)
from reference.user_embedder import load_factory
from travel_loss import travel_loss


def test_variants_differ_from_the_study_in_every_dimension_a_user_would():
    study, *others = VARIANTS
    assert study.name == "study" and not study.held_out and [v.held_out for v in others].count(True) >= 1
    for key in ("size", "skew", "embedder"):
        assert len({getattr(v, key) for v in VARIANTS}) >= 3, key
    polarity = {v.name: sum(v.style_b["paper"]) > sum(v.style_b["ink"]) for v in VARIANTS}
    assert len(set(polarity.values())) == 2  # dark-on-light and light-on-dark targets


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_variant_has_a_readable_ideal_and_an_embedder_that_keeps_it(variant):
    """The judge reads the ideal translations and not the inputs; the variant's frozen embedder puts
    a digit and its ideal translation closer, in travel terms, than a shuffled pairing: the loss can
    tell content kept from content lost, the premise of every lambda in the study."""
    domains = variant.domains(seed=0)
    judge = DigitJudge(domains.judge, domains.judge_labels)
    assert judge.accuracy(domains.a_test_ideal, domains.a_test_labels) >= 0.85
    assert judge.accuracy(domains.a_test, domains.a_test_labels) <= 0.2
    embedder = load_factory(_embedder_spec(variant.embedder))(image_size=variant.size)
    with torch.no_grad():
        source, ideal = embedder(domains.a_test), embedder(domains.a_test_ideal)
    shuffled = ideal[torch.randperm(len(ideal), generator=torch.Generator().manual_seed(0))]
    assert float(travel_loss(source, ideal)) < 0.7 * float(travel_loss(source, shuffled))


def test_the_quick_study_trains_scores_and_tabulates(tmp_path):
    assert STUDIES["lambda-transfer"][:2] == ("reference.studies.lambda_transfer", "run_lambda_transfer")
    report = run_lambda_transfer(tmp_path, quick=True, progress=False)
    assert (tmp_path / REPORT_NAME).is_file()
    assert {(row["variant"], row["rule"]) for row in report["rows"]} == {
        ("held-out", RULES[1].name),
        ("held-out", "auto"),
    }
    auto = next(row for row in report["rows"] if row["rule"] == "auto")
    assert auto["lambda_trajectory"] and auto["lambda_trajectory"][0] == 3.0  # the default's initial value
    for row in report["rows"]:
        assert 0 <= row["label_accuracy"] <= 1 and row["kid"] > 0
    table = format_transfer_table(report)
    assert "held-out" in table and "auto" in table and "(ideal" in table
