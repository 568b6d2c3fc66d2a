"""Claims as data (``claims/*.yaml``), the rules that decide them, and ``avlab reproduce``."""

import json
import math
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import AVLAB, ROOT, TINY_RUN
from sweeps import write_mem_claim
from orchestrator import tracking
from orchestrator.claims import Claim, _welch, all_claims, decide, load_claim, paired
from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.search_space import load_search_space


def test_every_claim_file_loads_against_its_search_space():
    claims = [load_claim(p) for p in all_claims()]
    assert len(claims) >= 18
    rules = {c.rule for c in claims}
    # No paper states a strict ordering of more than two rows: "ordering" is for claims that do.
    assert rules == {"greater", "argmax", "plateau", "peak", "above"}
    # Every ablation the README lists as a search space has at least one claim.
    spaces = {c.search_space.name for c in claims}
    for space in ("memory_size_fig6.yaml", "unpaired_volume_fig5.yaml", "paired_volume_table5.yaml",
                  "loss_weight_supp_table2.yaml", "data_types_image_supp_table3.yaml",
                  "data_types_sound_supp_table4.yaml", "method_comparison.yaml", "avid_variants_table1.yaml",
                  "cma_weight_fig3.yaml", "cma_positive_rule_fig4.yaml", "multissl_combinations.yaml",
                  "multissl_tasks_small.yaml"):
        assert space in spaces, space


def test_a_papers_claim_quotes_it_and_a_sanity_check_is_never_attributed_to_one():
    claims = [load_claim(p) for p in all_claims()]
    for claim in claims:
        if claim.kind == "paper":
            assert len(claim.quote) > 40, claim.id
        else:
            assert claim.kind == "sanity_check" and not claim.paper_values, claim.id
            assert "sanity check" in claim.where, claim.id
    assert sum(c.kind == "sanity_check" for c in claims) == 6


def test_a_papers_claim_compares_the_papers_algorithm_never_a_labelled_modification(tmp_path):
    """avlab's modifications are rows of their own, labelled in the search space (roles): a claim
    attributed to a paper that names one is refused; its sanity checks may, and the verdicts
    print the role beside the row. The post-hoc foreground probe decides no paper's claim."""
    for claim in (load_claim(p) for p in all_claims()):
        space = load_search_space(claim.search_space)
        named = [x for v in claim.rows.values() for x in (v if isinstance(v, list) else [v])]
        if claim.kind == "paper":
            assert not any(space.role(x) for x in named), claim.id
            assert not claim.metric.startswith("fg_"), claim.id
    control = load_search_space(ROOT / "search_spaces" / "multissl_tasks_small.yaml")
    assert control.role("temporal_gap_glides") == "engineered positive control" and control.role("temporal_gap") == ""
    assert control.first_config().data.glide_octaves == 0  # the preset's scenes are the paper's kind
    space = tmp_path / "space.yaml"  # beside the claim
    space.write_text("base:\n  preset: tiny\nvariants:\n  plain: {method.memory_size: 8}\n"
                     "  mine: {method.memory_size: 16}\nroles: {mine: modified}\nmetric: image_h_linear_acc\n")
    claim = tmp_path / "c.yaml"
    fields = {"claim": "c", "paper": "BMA-Memory (paper 001)", "where": "Fig. 6", "quote": "x" * 50,
              "search_space": space.name, "metric": "image_h_linear_acc",
              "rule": {"type": "greater", "a": "mine", "b": "plain"}}
    claim.write_text(yaml.safe_dump(fields))
    with pytest.raises(ConfigError, match=r"rule\.a: 'mine' is a modified row of space\.yaml, not the paper's algorithm"):
        load_claim(claim)
    del fields["quote"]
    claim.write_text(yaml.safe_dump({**fields, "kind": "sanity_check", "where": "avlab's sanity check"}))
    assert load_claim(claim).kind == "sanity_check"
    space.write_text(space.read_text().replace("{mine: modified}", "{mine: improved}"))
    with pytest.raises(ConfigError, match=r"roles\.mine: expected one of 'modified', 'engineered positive control'"):
        load_search_space(space)


PAPERS = ROOT.parent / "shared" / "papers"


@pytest.mark.skipif(not PAPERS.is_dir(), reason=f"the papers' text is not at {PAPERS}")
def test_every_quote_is_in_its_papers_text_verbatim():
    """Each part of a quote (between "...") occurs in the text of the paper it names (for the
    BMA-Memory paper, its main text or its supplement), whitespace aside."""
    texts = {p.name[:3]: re.sub(r"\s+", " ", p.read_text().replace("\xa0", " ")) for p in PAPERS.glob("0*.txt")}
    for claim in (load_claim(p) for p in all_claims()):
        if not claim.quote:
            continue
        number = re.search(r"paper (\d{3})", claim.paper).group(1)
        where = [texts[number], *([texts["000"]] if number == "001" else [])]
        for part in filter(None, (re.sub(r"\s+", " ", x).strip() for x in claim.quote.split("..."))):
            assert any(part in text for text in where), (claim.id, part)


GOOD = {
    "claim": "more memory is better", "paper": "BMA-Memory", "where": "Fig. 6",
    "quote": "the performance improves as the memory grows", "search_space": "memory_size_fig6.yaml", "metric": "image_h_linear_acc",
    "rule": {"type": "greater", "a": "method.memory_size=500", "b": "method.memory_size=10"},
}


@pytest.mark.parametrize("change, message", [
    ({"claimm": "x"}, r"bad\.yaml: claimm: unknown claim key"),
    ({"claim": ""}, r"bad\.yaml: claim: expected a non-empty string"),
    ({"search_space": "nowhere.yaml"}, r"bad\.yaml: search_space: nowhere\.yaml not found"),
    ({"metric": "top1"}, r"bad\.yaml: metric: 'top1' is not logged"),
    ({"rule": {"type": "bigger", "a": "x", "b": "y"}}, r"bad\.yaml: rule\.type: expected one of greater"),
    ({"rule": {"type": "greater", "a": "method.memory_size=7", "b": "method.memory_size=10"}},
     r"bad\.yaml: rule\.a: 'method\.memory_size=7' is not a configuration of memory_size_fig6\.yaml"),
    ({"rule": {"type": "greater", "a": "method.memory_size=500", "b": "method.memory_size=10", "delta": 1}},
     r"bad\.yaml: rule\.delta: not a field of a greater rule"),
    ({"rule": {"type": "plateau", "after": "method.memory_size=500",
               "rows": ["method.memory_size=500", "method.memory_size=1000"], "delta": -0.1}},
     r"bad\.yaml: rule\.delta: must be positive"),
    ({"rule": {"type": "above", "row": "method.memory_size=500", "value": float("nan")}},
     r"bad\.yaml: rule\.value: expected a finite number"),
    ({"paper_values": {"method.memory_size=500": "high"}}, r"bad\.yaml: paper_values\.method\.memory_size=500: expected a finite"),
    ({"quote": None}, r"bad\.yaml: quote: expected a non-empty string"),
    ({"kind": "hunch"}, r"bad\.yaml: kind: expected one of paper, sanity_check, got 'hunch'"),
    ({"kind": "sanity_check", "paper_values": {"method.memory_size=500": 0.5}},
     r"bad\.yaml: paper_values: a sanity check is avlab's own"),
])
def test_a_bad_claim_file_exits_2_naming_the_file_and_field(tmp_path, capsys, change, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, **change}))
    assert main(["--home", str(tmp_path / "home"), "reproduce", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "home").exists()


def _manifest(path: Path, pairs: int, sounds: int) -> Path:
    """A manifest of ``pairs`` pairs, ``sounds`` unpaired sounds and labelled train / test rows
    (read, never decoded: the files need not exist)."""
    rows = ["id,split,pair_id,source,label,image,image_time,sound,sound_offset,sound_duration,fold"]
    rows += [f"p{i},pretrain,,,,p{i}.png,,p{i}.wav,,," for i in range(pairs)]
    rows += [f"s{i},pretrain,,,,,,s{i}.wav,,," for i in range(sounds)]
    rows += [f"{split}{i},{split},,,{'ab'[i % 2]},{split}{i}.png,,{split}{i}.wav,,," for split in ("train", "test")
             for i in range(8)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_data_volume_claims_configurations_read_different_pools_of_a_manifest(tmp_path, capsys):
    """Table 5's fields (the share of the pairs, unpaired sounds as a multiple of the pairs) act
    on a manifest as on the embedded data: its four configurations read four different pools. A
    multiple the manifest cannot serve, and a field that acts on the embedded data only, are
    refused in one line before anything is created."""
    from methods.data import build_dataset

    manifest = _manifest(tmp_path / "m.csv", pairs=40, sounds=20)
    space = load_search_space(ROOT / "search_spaces" / "paired_volume_table5.yaml").with_overrides(
        "tiny", [f"data.manifest={manifest}", "train.batch_size=4"])
    infos = [build_dataset(space.config_for(p, 0).data).info() for p in space.grid_points()]
    assert [(i.paired_size, i.unpaired_sound_size, i.unpaired_image_size) for i in infos] == [
        (8, 0, 0), (8, 20, 0), (40, 0, 0), (40, 20, 0)]  # 20 % of 40 pairs; 0.5 x all 40 pairs
    home = tmp_path / "home"
    fig5 = str(ROOT / "claims" / "bma_fig5_unpaired_volume_helps.yaml")  # 2 x 40 pairs: 80 sounds, of 20
    assert main(["--home", str(home), "reproduce", fig5, "--data", str(manifest), "--preset", "tiny",
                 "train.batch_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.unpaired_sound_per_pair=2 asks for 80 unpaired_sound items" in err
    assert not home.exists()
    sized = tmp_path / "sized.yaml"
    sized.write_text("base:\n  preset: tiny\ngrid:\n  data.unpaired_sound_size: [0, 256]\nmetric: image_h_linear_acc\n")
    claim = tmp_path / "c.yaml"
    claim.write_text(yaml.safe_dump({"claim": "c", "paper": "p", "where": "avlab's sanity check", "kind": "sanity_check",
                                     "search_space": sized.name, "metric": "image_h_linear_acc",
                                     "rule": {"type": "greater", "a": "data.unpaired_sound_size=256",
                                              "b": "data.unpaired_sound_size=0"}}))
    assert main(["--home", str(home), "reproduce", str(claim), "--data", str(manifest), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.unpaired_sound_size: sizes the embedded dataset's pools" in err
    assert not home.exists()


def test_reproduce_needs_claims_or_all(tmp_path, capsys):
    assert main(["--home", str(tmp_path), "reproduce"]) == 2
    assert "CLAIM: name claim files, or give --all" in capsys.readouterr().err


def _claim(rule: str, **fields) -> Claim:
    numbers = {k: fields.pop(k) for k in ("delta", "value") if k in fields}
    return Claim(id="c", path=Path("c.yaml"), statement="", paper="", where="", search_space=Path("s.yaml"),
                 metric="m", rule=rule, rows=fields, numbers=numbers)


def test_welch_matches_the_hand_computed_test():
    # a = 1, 2, 3 and b = 4, 5, 6: difference -3, variances 1, se = sqrt(2/3), df = 4, t = -3.674.
    diff, ci, p = _welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert diff == -3.0
    assert ci == pytest.approx(2.776445 * math.sqrt(2 / 3), rel=1e-5)  # t_0.975(4) * se
    assert p == pytest.approx(0.02131, abs=1e-4)


def test_welch_on_seeds_equal_on_each_side_is_an_exact_permutation_test_not_certainty():
    """Probe accuracies are multiples of 1/n_test: two configurations can score the same on every
    seed. Welch's standard error is then 0 (or float rounding), which read as certainty; the
    exact permutation test needs 4 + 4 seeds to decide (p = 2 / C(8, 4))."""
    third = 1 / 3
    assert _welch([0.4 + third - third] * 2, [0.3] * 2)[2] == pytest.approx(1 / 3)
    assert _welch([0.4] * 3, [0.3] * 3)[2] == pytest.approx(0.1)
    assert _welch([0.4] * 4, [0.3] * 4)[2] == pytest.approx(2 / 70)
    assert _welch([0.3] * 3, [0.3 + 1e-12] * 3)[2] == 1.0
    from orchestrator.claims import compare

    assert compare([0.4] * 3, [0.3] * 3) == 0 and compare([0.4] * 4, [0.3] * 4) == 1


def _seeds(values: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    """Each configuration's values as seeds 0, 1, ... (what a sweep's trials give)."""
    return {label: dict(enumerate(v)) for label, v in values.items()}


HIGH, LOW, NOISY = [0.80, 0.82, 0.81], [0.50, 0.53, 0.50], [0.40, 0.90, 0.62]  # HIGH - LOW: 0.30, 0.29, 0.31


@pytest.mark.parametrize("values, verdict", [
    ({"a": HIGH, "b": LOW}, "holds"),  # a clear win
    ({"a": LOW, "b": HIGH}, "contradicted"),  # a clear loss
    ({"a": NOISY, "b": [0.6, 0.5, 0.7]}, "inconclusive"),  # the differences scatter
    ({"a": [0.9], "b": [0.1]}, "inconclusive"),  # one seed decides nothing
    ({"a": HIGH, "b": []}, "inconclusive"),  # a configuration never finished
])
def test_greater(values, verdict):
    v = decide(_claim("greater", a="a", b="b"), _seeds(values))
    assert v.verdict == verdict
    if verdict != "inconclusive":
        assert v.effect == pytest.approx(0.3 if verdict == "holds" else -0.3)


def test_ordering_argmax_and_peak_decide_every_pair():
    values = _seeds({"x": HIGH, "y": [0.65, 0.66, 0.64], "z": LOW})
    assert decide(_claim("ordering", rows=["x", "y", "z"]), values).verdict == "holds"
    assert decide(_claim("ordering", rows=["x", "z", "y"]), values).verdict == "contradicted"
    noisy = {**values, "y": dict(enumerate(NOISY))}
    assert decide(_claim("ordering", rows=["x", "y", "z"]), noisy).verdict == "inconclusive"
    assert decide(_claim("argmax", best="x", among=["x", "y", "z"]), values).verdict == "holds"
    v = decide(_claim("argmax", best="y", among=["x", "y", "z"]), values)
    assert v.verdict == "contradicted" and v.effect == pytest.approx(0.65 - 0.81)
    assert decide(_claim("peak", at="x", rows=["z", "x", "y"]), values).verdict == "holds"
    assert decide(_claim("peak", at="y", rows=["x", "y", "z"]), values).verdict == "contradicted"


def test_plateau_and_above():
    flat = {"n10": LOW, "n500": HIGH, "n1000": [0.805, 0.815, 0.812], "n5000": [0.81, 0.815, 0.805]}
    rows = ["n10", "n500", "n1000", "n5000"]
    assert decide(_claim("plateau", after="n500", rows=rows, delta=0.05), _seeds(flat)).verdict == "holds"
    climbing = {**flat, "n5000": [0.95, 0.96, 0.94]}
    v = decide(_claim("plateau", after="n500", rows=rows, delta=0.05), _seeds(climbing))
    assert v.verdict == "contradicted" and v.effect == pytest.approx(0.14)
    noisy = _seeds({**flat, "n5000": NOISY})
    assert decide(_claim("plateau", after="n500", rows=rows, delta=0.05), noisy).verdict == "inconclusive"
    assert decide(_claim("above", row="x", value=0.5), _seeds({"x": HIGH})).verdict == "holds"
    assert decide(_claim("above", row="x", value=0.9), _seeds({"x": HIGH})).verdict == "contradicted"
    assert decide(_claim("above", row="x", value=0.6), _seeds({"x": NOISY})).verdict == "inconclusive"
    assert decide(_claim("above", row="x", value=0.5), _seeds({"x": [0.99]})).verdict == "inconclusive"


def test_a_difference_every_seed_shows_holds_paired_where_welch_sees_nothing():
    """Seeds move both configurations together (their data, their initialisation): the paired test
    sees a difference of 0.009-0.012 on every seed that Welch's, comparing the seeds' spread of
    0.08, cannot."""
    from scipy import stats

    a = [0.50, 0.60, 0.70, 0.55]
    b = [x - d for x, d in zip(a, [0.010, 0.012, 0.011, 0.009])]
    assert _welch(a, b)[2] > 0.8
    v = decide(_claim("greater", a="a", b="b"), _seeds({"a": a, "b": b}))
    reference = stats.ttest_rel(a, b)
    assert v.verdict == "holds" and v.p == pytest.approx(reference.pvalue, rel=1e-9)
    d = [x - y for x, y in zip(a, b)]
    se = stats.sem(d)
    assert v.effect == pytest.approx(0.0105) and v.ci == pytest.approx(stats.t.ppf(0.975, 3) * se)
    assert v.mde == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * se) and v.seeds == 4
    # Only the seeds both finished are paired: a fifth seed of one side changes nothing.
    uneven = {"a": {**dict(enumerate(a)), 4: 0.1}, "b": dict(enumerate(b))}
    assert decide(_claim("greater", a="a", b="b"), uneven) == v


def test_the_same_difference_on_every_seed_is_decided_by_the_sign_flip_test_not_by_rounding():
    """Probe accuracies are multiples of 1/n_test, so two seeds can differ by the same amount,
    up to float rounding; the t statistic of such differences is rounding noise (p ~ 0). The exact
    sign-flip test decides them: p = 2 / 2^n, so two seeds of one sign decide nothing (0.5), six do
    (0.031)."""
    two = _seeds({"a": [0.8, 0.7], "b": [0.6, 0.5]})  # 0.2 and 0.19999999999999996
    diff, ci, p, n, mde = paired(two["a"], two["b"])
    assert (diff, ci, p, n, mde) == (pytest.approx(0.2), 0.0, 0.5, 2, math.inf)  # two seeds can detect nothing
    assert decide(_claim("greater", a="a", b="b"), two).verdict == "inconclusive"
    six = _seeds({"a": [0.8 + 0.01 * i for i in range(6)], "b": [0.6 + 0.01 * i for i in range(6)]})
    assert paired(six["a"], six["b"])[2::2] == (pytest.approx(1 / 32), 0.0)
    assert decide(_claim("greater", a="a", b="b"), six).verdict == "holds"
    assert paired(six["b"], six["b"])[2] == 1.0


def test_a_reversal_that_holm_removes_leaves_an_ordering_inconclusive():
    """One reversal among three comparisons at p 0.024 (< 0.05, not < 0.05 / 3): alone it would
    contradict the ordering; Holm's correction over the claim's three pairs leaves it undecided."""
    from scipy import stats

    b = [0.60, 0.62, 0.58, 0.61, 0.59]
    c = [x + d for x, d in zip(b, [0.03, 0.005, 0.02, 0.035, 0.01])]  # c above b: reverses b > c
    a = [x + d for x, d in zip(b, [0.05, -0.04, 0.02, -0.03, 0.01])]  # a ~ b
    e = [x + d for x, d in zip(c, [-0.05, 0.04, -0.01, 0.03, -0.02])]  # c ~ e
    p = stats.ttest_rel(b, c).pvalue
    assert 0.05 / 3 < p < 0.05
    v = decide(_claim("ordering", rows=["a", "b", "c", "e"]), _seeds({"a": a, "b": b, "c": c, "e": e}))
    assert v.verdict == "inconclusive" and "b ~ c" in v.detail and f"Holm {min(1.0, 3 * p):.3g}" in v.detail
    assert decide(_claim("greater", a="b", b="c"), _seeds({"b": b, "c": c})).verdict == "contradicted"  # alone


def test_holm_and_the_family_wise_verdicts_against_hand_computed_cases():
    from orchestrator.claims import Verdict, family_wise, holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.01, math.nan]) == pytest.approx([0.02, 1.0])
    table = [Verdict("holds", 0.1, "", p=0.01), Verdict("contradicted", -0.1, "", p=0.02),
             Verdict("holds", 0.1, "", p=0.045), Verdict("inconclusive", 0.0, "", p=0.3)]
    # m = 4: 0.01 x 4 = 0.04 < 0.05; 0.02 x 3 = 0.06: stop. The rest stay or become inconclusive.
    assert family_wise(table) == ["holds", "inconclusive", "inconclusive", "inconclusive"]


def test_the_sequential_rule_keeps_false_verdicts_at_five_percent_over_its_looks():
    """2 000 claims with no effect (two configurations of one distribution, paired by seed), looked
    at with 3, 6 and 9 seeds: deciding every look at 5 % ends about one in ten holds or
    contradicted; the rule --until-decided uses (5 % over the looks) stays at most 5 %."""
    import numpy as np

    from orchestrator.claims import look_alpha, looks

    assert looks(3, 9) == [3, 6, 9] and looks(3, 10) == [3, 6, 9, 10] and looks(2, 2) == [2]
    assert look_alpha(3, 9) == pytest.approx(0.05 / 3)
    rng = np.random.default_rng(0)
    claim = _claim("greater", a="a", b="b")
    wrong = {"rule": 0, "naive": 0}
    for _ in range(2000):
        shared = rng.normal(0.5, 0.05, 9)  # what a seed gives both configurations (data, init)
        a, b = shared + rng.normal(0, 0.01, 9), shared + rng.normal(0, 0.01, 9)
        for name, alpha in (("rule", look_alpha(3, 9)), ("naive", 0.05)):
            wrong[name] += any(decide(claim, _seeds({"a": list(a[:n]), "b": list(b[:n])}), alpha).verdict
                               != "inconclusive" for n in looks(3, 9))
    assert wrong["rule"] / 2000 <= 0.05 < 0.07 < wrong["naive"] / 2000


def test_a_claims_sweep_is_named_by_the_trials_it_resolves_to_not_by_a_presets_name(tmp_path, monkeypatch):
    """The name's hash covers the resolved search space (not where its file lives), every trial's
    resolved configuration and the results version: a preset whose contents changed under the
    same name, or code whose numbers changed, names another sweep; and only a sweep of that very
    name is taken whole (an earlier one of the same search space is not)."""
    from orchestrator import config, jobs, tracking
    from orchestrator.reproduce import _same_sweeps, sweep_content, sweep_digest

    text = ("base:\n  preset: tiny\ngrid:\n  method.memory_size: [8, 16]\nseeds: 1\n"
            "metric: image_h_linear_acc\nmode: max\n")
    for where, body in (("a", text), ("b", text), ("c", text.replace("seeds: 1", "seeds: 2"))):
        (tmp_path / where).mkdir()
        (tmp_path / where / "mem.yaml").write_text(body)

    def space(where: str):  # loaded afresh: a space resolves each trial once
        return load_search_space(tmp_path / where / "mem.yaml").with_overrides("tiny", [])

    assert sweep_content(space("a")) == sweep_content(space("b")) != sweep_content(space("c"))
    digest = sweep_digest(space("a"))
    assert digest == sweep_digest(space("b")) != sweep_digest(space("c"))
    # The tiny preset's learning rate changed: the same search space, the same preset name.
    tiny = {**config.PRESETS["tiny"], "optim": {**config.PRESETS["tiny"]["optim"], "lr": 0.002}}
    with monkeypatch.context() as m:
        m.setitem(config.PRESETS, "tiny", tiny)
        assert sweep_content(space("a")) == sweep_content(space("b")) and sweep_digest(space("a")) != digest
    with monkeypatch.context() as m:
        m.setattr(tracking, "RESULTS_VERSION", tracking.RESULTS_VERSION + 1)
        assert sweep_digest(space("a")) != digest
    assert sweep_digest(space("a")) == digest

    home = tmp_path / "home"
    jobs.write(home, jobs.JobRecord(kind="sweep", name="reproduce-mem-tiny-s1-0ld00000", run_id="0" * 32,
                                    tracking_uri="sqlite:///x.db", space=space("a").to_dict()))
    assert _same_sweeps(home, f"reproduce-mem-tiny-s1-{digest}") == []
    assert _same_sweeps(home, "reproduce-mem-tiny-s1-0ld00000") == ["reproduce-mem-tiny-s1-0ld00000"]


def test_the_budget_lists_the_paired_volumes_a_grid_varies_not_the_first_trials_alone():
    from orchestrator.reproduce import budget_line

    table5 = load_search_space(Path("search_spaces/paired_volume_table5.yaml"), seeds=3)
    assert budget_line(table5.with_overrides("small", [])) == "small: 4 or 20 epochs, 3277 or 16384 pairs, 3 seeds"
    fig6 = load_search_space(Path("search_spaces/memory_size_fig6.yaml"), seeds=1).with_overrides("small", [])
    assert budget_line(fig6) == f"small: 4 epochs, {fig6.first_config().data.paired_size} pairs, 1 seed"


@pytest.mark.slow
def test_reproduce_runs_a_claims_sweep_then_reuses_it_without_training_here_and_in_a_home_it_moves_to(tmp_path, capsys):
    space = tmp_path / "mem.yaml"
    space.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [8, 16]\nseeds: 1\n"
                     "metric: image_h_linear_acc\nmode: max\nresources: {workers: 1, cpus_per_worker: 1}\n"
                     "max_concurrent: 2\n")
    claim = tmp_path / "mem_claim.yaml"
    claim.write_text("claim: a larger memory helps\npaper: BMA-Memory\nwhere: Fig. 6\nquote: more memory helps\n"
                     "search_space: mem.yaml\nmetric: image_h_linear_acc\nrule: {type: greater, a: method.memory_size=16, "
                     "b: method.memory_size=8}\npaper_values: {method.memory_size=16: 0.77}\n")
    home = tmp_path / "home"
    # Nothing run yet: --finished-only decides nothing and leaves no store behind.
    assert main(["--home", str(home), "reproduce", str(claim), "--finished-only", *TINY_RUN]) == 0
    assert not home.exists()
    cmd = [AVLAB, "--home", str(home), "reproduce", str(claim), *TINY_RUN]
    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[avlab] reproduce: sweep reproduce-mem-tiny-s1-" in first.stdout
    # The same claim from another checkout (the files elsewhere) finds the sweep all the same.
    other = tmp_path / "other"
    other.mkdir()
    for f in (space, claim):
        (other / f.name).write_text(f.read_text())
    cmd[cmd.index(str(claim))] = str(other / claim.name)
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=other, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing finished sweep reproduce-mem-tiny-s1-" in second.stdout
    # Two trials in all: the second call trained nothing.
    con = sqlite3.connect(home / "mlflow.db")
    kinds = [k for (k,) in con.execute("select value from tags where key = 'avlab.kind'")]
    assert kinds.count("trial") == 2 and kinds.count("sweep") == 1 and kinds.count("claims") == 2
    reports = sorted((home / "reports" / "claims").iterdir())
    assert len(reports) == 2
    docs = [json.loads((r / "verdicts.json").read_text()) for r in reports]
    for doc in docs:
        assert doc["format"] == 1 and doc["preset"] == "tiny"
        (entry,) = doc["claims"]
        assert entry["id"] == "mem_claim" and entry["verdict"] == "inconclusive"  # one seed decides nothing
        assert [r["configuration"] for r in entry["rows"]] == ["method.memory_size=16", "method.memory_size=8"]
        assert entry["rows"][0]["paper"] == 0.77 and len(entry["rows"][0]["values"]) == 1
        assert (Path(reports[0]) / "figures" / "mem_claim.png").stat().st_size > 0
        assert entry["code"] == {tracking.source_hash(): 2}  # both trials, this code
    assert docs[0]["claims"][0]["rows"] == docs[1]["claims"][0]["rows"]
    markdown = (reports[1] / "verdicts.md").read_text()
    assert "| mem_claim: a larger memory helps (Fig. 6) | method.memory_size=16 0.770 |" in markdown
    assert f"Every trial ran on code {tracking.source_hash()} (tag `avlab.source_hash`)." in markdown
    # `avlab report` of the claim's sweep links back to the verdicts.
    sweep = docs[1]["claims"][0]["sweep"]
    report = subprocess.run([AVLAB, "--home", str(home), "report", sweep, "--format", "markdown"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "mem_claim: inconclusive" in report.stdout and "verdicts.md" in report.stdout

    # --finished-only runs nothing: it decides the claims whose sweeps have finished and lists the
    # others (here a claim on another space, never run).
    (tmp_path / "mem2.yaml").write_text(space.read_text().replace("[8, 16]", "[8, 32]"))
    pending = tmp_path / "pending_claim.yaml"
    pending.write_text(claim.read_text().replace("mem.yaml", "mem2.yaml").replace("=16", "=32"))
    capsys.readouterr()
    assert main(["--home", str(home), "reproduce", str(pending), str(claim), "--finished-only", *TINY_RUN]) == 0
    assert "[avlab] reproduce:   mem2.yaml: not started (2 trials) for pending_claim" in capsys.readouterr().out
    kinds = [k for (k,) in con.execute("select value from tags where key = 'avlab.kind'")]
    assert kinds.count("trial") == 2 and kinds.count("sweep") == 1  # nothing ran
    (third,) = set((home / "reports" / "claims").iterdir()) - set(reports)
    doc = json.loads((third / "verdicts.json").read_text())
    assert [e["id"] for e in doc["claims"]] == ["mem_claim"] and doc["pending"] == ["pending_claim"]
    assert doc["claims"][0]["rows"] == docs[1]["claims"][0]["rows"]
    assert "Not decided (their sweeps have not finished): pending_claim." in (third / "verdicts.md").read_text()

    # Moved to another home as a bundle: there the claim is decided without training (the trials
    # are the imported ones), to the same rows, and `avlab report` prints the same report.
    bundle, moved = tmp_path / "bundle", tmp_path / "moved"
    out = subprocess.run([AVLAB, "--home", str(home), "results", "export", sweep, "--out", str(bundle)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"[avlab] exported {sweep}: 3 runs" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([AVLAB, "--home", str(moved), "results", "import", str(bundle)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"[avlab] imported {sweep}: 3 runs" in out.stdout, out.stderr[-2000:]
    cmd[cmd.index("--home") + 1] = str(moved)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=other, env=env, timeout=600)
    assert again.returncode == 0 and f"reusing finished sweep {sweep}" in again.stdout, again.stderr[-3000:]
    (moved_report,) = (moved / "reports" / "claims").iterdir()
    doc = json.loads((moved_report / "verdicts.json").read_text())
    assert doc["claims"][0]["rows"] == docs[1]["claims"][0]["rows"] and doc["claims"][0]["verdict"] == "inconclusive"
    con = sqlite3.connect(moved / "mlflow.db")
    kinds = [k for (k,) in con.execute("select value from tags where key = 'avlab.kind'")]
    assert kinds.count("trial") == 2 and kinds.count("sweep") == 1  # nothing trained there
    for form in ("markdown", "json"):
        printed = [subprocess.run([AVLAB, "--home", str(h), "report", sweep, "--format", form], capture_output=True,
                                  text=True, timeout=300) for h in (home, moved)]
        assert all(r.returncode == 0 for r in printed)
        if form == "json":  # what differs: the parent run's id in each store...
            ids = [json.loads(r.stdout)["parent_run_id"] for r in printed]
            printed[1].stdout = printed[1].stdout.replace(ids[1], ids[0])
        # ... and the path of each home's latest verdicts
        same = [re.sub(r"\S*/reports/claims/[^/]+/verdicts\.md", "VERDICTS", r.stdout) for r in printed]
        assert same[0] == same[1] and same[0].count("VERDICTS") == 1, form
    # Trials computed in another environment (their tags say so): reproduce refuses to decide from
    # them, in one line before anything runs, unless told to, and then the verdicts say so.
    client = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}")
    trials = client.search_runs([client.get_experiment_by_name("avlab-sweeps").experiment_id],
                                "tags.`avlab.kind` = 'trial'")
    for trial in trials:
        client.set_tag(trial.info.run_id, "avlab.env.id", "0123456789abcdef")
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=other, env=env, timeout=600)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert (f"finished sweep {sweep}: 2 of 2 trials were computed in environment 0123456789abcdef, not in this one"
            in refused.stderr and "--reuse-across-environments" in refused.stderr)
    taken = subprocess.run([*cmd, "--reuse-across-environments"], capture_output=True, text=True, cwd=other,
                           env=env, timeout=600)
    assert taken.returncode == 0, taken.stderr[-2000:]
    latest = max((moved / "reports" / "claims").iterdir())
    entry = json.loads((latest / "verdicts.json").read_text())["claims"][0]
    assert entry["elsewhere"].startswith("2 of 2 trials were computed in environment 0123456789abcdef")
    assert "Decided from trials computed in another environment" in (latest / "verdicts.md").read_text()
    # Imported twice, the name is taken: refused before anything is written.
    out = subprocess.run([AVLAB, "--home", str(moved), "results", "import", str(bundle)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"this home already has a job named {sweep!r}" in out.stderr
    assert [k for (k,) in con.execute("select value from tags where key = 'avlab.kind'")].count("trial") == 2

    # What a claim's sweep resolves to changes (here its space's grid; a preset's change resolves
    # the same way, to other trial configurations): reproduce in the same home runs another sweep,
    # in which the unchanged trial takes the finished one's results and only the changed one
    # trains; its output says which.
    space.write_text(space.read_text().replace("[8, 16]", "[8, 32]"))
    claim.write_text(claim.read_text().replace("=16", "=32"))
    cmd[cmd.index("--home") + 1] = str(home)
    cmd[cmd.index(str(other / claim.name))] = str(claim)
    changed = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[avlab] reproduce: sweep reproduce-mem-tiny-s1-" in changed.stdout
    assert "trial method.memory_size=8 seed 0: not trained again; the results of the identical finished " \
           f"trial {sweep}/" in changed.stdout
    assert "trial method.memory_size=32 seed 0: not trained again" not in changed.stdout
    con = sqlite3.connect(home / "mlflow.db")
    launchers = sorted(v for (v,) in con.execute("select value from tags where key = 'avlab.launcher'"))
    assert launchers == ["reused", "trial", "trial", "trial"]  # two first trials, then one trained, one reused


@pytest.mark.slow
def test_until_decided_adds_a_round_of_seeds_to_an_undecided_claim_then_stops_at_its_budget(tmp_path):
    """Two seeds leave a claim undecided (a paired test on two seeds decides only a difference 25
    times its spread, at 2.5 % per look): --until-decided runs its sweep again with three, whose
    first two seeds' trials are the first round's, and stops there, its budget spent."""
    claim = write_mem_claim(tmp_path)
    home = tmp_path / "home"
    cmd = [AVLAB, "--home", str(home), "reproduce", str(claim), "--until-decided", "--seeds", "2", "--max-seeds", "3",
           *TINY_RUN]
    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "until decided: looks at 2, 3 seeds, each at p < 0.025 (5 % over 2 looks)" in out.stdout
    assert "[avlab] reproduce: 2 seeds for 1 claim(s): mem_claim" in out.stdout
    assert "[avlab] reproduce: 3 seeds for 1 claim(s): mem_claim" in out.stdout
    con = sqlite3.connect(home / "mlflow.db")
    launchers = sorted(v for (v,) in con.execute("select value from tags where key = 'avlab.launcher'"))
    assert launchers == ["reused"] * 4 + ["trial"] * 6  # 4 trials, then 6 of which 4 were the first round's
    latest = max((home / "reports" / "claims").iterdir())
    doc = json.loads((latest / "verdicts.json").read_text())
    assert doc["sequential"]["looks"] == [2, 3] and doc["sequential"]["alpha_per_look"] == pytest.approx(0.025)
    (entry,) = doc["claims"]
    assert entry["paired_seeds"] == 3 and [len(r["values"]) for r in entry["rows"]] == [3, 3]
    assert doc["sequential"]["undecided_at_budget"] == ([] if entry["verdict"] != "inconclusive" else ["mem_claim"])
    assert "Seeds added until decided: looks at 2, 3 seeds" in (latest / "verdicts.md").read_text()


def test_an_undecided_claim_says_how_far_its_sweep_got(tmp_path):
    """--finished-only's progress line: the finished trials of all the sweep runs, or not started."""
    from orchestrator.reproduce import _progress
    from orchestrator.runs import SWEEP_EXPERIMENT

    path = tmp_path / "mem.yaml"
    path.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [8, 16]\nseeds: 2\n")
    space = load_search_space(path)
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    assert _progress(client, [], space, ["c1"]) == ("mem.yaml: not started (4 trials) for c1", [], [])
    parent = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT, run_name="s",
                                 params={}, tags={"kind": "sweep", "sweep_name": "s"}, config_yaml="")
    # Two finished trials (one trained for 90 s, one reused from another sweep), one running.
    for i, (status, reused) in enumerate([("FINISHED", False), ("FINISHED", True), ("RUNNING", False)]):
        run = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT, run_name=f"t{i}",
                                  params={}, tags={"kind": "trial", **({"reused_from": "x"} if reused else {})},
                                  config_yaml="", parent_run_id=parent)
        if status == "FINISHED":
            start = client.get_run(run).info.start_time
            client.set_terminated(run, "FINISHED", end_time=start + 90_000)
    line, finished, seconds = _progress(client, ["s"], space, ["c1", "c2"])
    assert line == "s: 2 of 4 trials finished for c1, c2" and len(finished) == 2 and seconds == [90.0]


def test_trials_left_that_repeat_a_finished_or_an_earlier_trial_are_not_counted_to_train(tmp_path):
    """A trial left whose config and seed equal a finished, fully evaluated trial in the store, or a
    trial left in an earlier sweep, will be reused; one stopped early or never evaluated will not."""
    from orchestrator.reproduce import trials_to_train
    from orchestrator.runs import SWEEP_EXPERIMENT

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [8, 16]\nseeds: 2\n")
    second.write_text("base:\n  preset: tiny\ngrid:\n  method.memory_size: [16, 32]\nseeds: 2\n")
    a, b = load_search_space(first), load_search_space(second)
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    assert trials_to_train(client, [(a, []), (b, [])]) == [(4, 4), (4, 2)]  # b's memory 16 repeats a's

    def trial(cfg, **extra):
        run = tracking.create_run(tracking_uri=uri, home=home, experiment=SWEEP_EXPERIMENT, run_name="t", params={},
                                  tags={"kind": "trial", "run_identity": cfg.identity(), **extra}, config_yaml="")
        client.log_metric(run, "eval_time_s", 1.0)
        client.set_terminated(run, "FINISHED")
        return client.get_run(run)

    trial(a.config_for({"method.memory_size": 8}, 0))  # finished elsewhere: reused
    trial(a.config_for({"method.memory_size": 8}, 1), stopped_early="true")  # not a result: trains
    own = trial(a.config_for({"method.memory_size": 16}, 0))  # a's own finished trial: not left
    # a: 8/0 reused, 8/1 and 16/1 train; b: 16/0 is a's finished one, 16/1 a's left one, 32 trains.
    assert trials_to_train(client, [(a, [own]), (b, [])]) == [(3, 2), (4, 2)]


def test_the_time_left_is_rounds_of_trials_at_once_times_the_median_finished_trial():
    """Per sweep: ceil(to train / at once) rounds x the median of its own finished trials, or of
    all finished trials when it has none; nothing to time it with, no estimate."""
    from orchestrator.reproduce import time_left

    # 5 rounds x 400 s (its own median) + 8 rounds x 350 s (the pooled median) = 4800 s.
    line = time_left([(12, 10, 2, [300, 400, 500]), (15, 15, 2, [])], [300, 400, 500, 200])
    assert line.startswith("27 trials left, 2 of them repeat a finished or an earlier trial (reused, not trained): "
                           "25 to train, about 1.3 h of wall time") and "all 4 finished: 5.8 min" in line
    assert time_left([(1, 1, 2, [60.0])], [60.0]).startswith("1 trial left: 1 to train, about 1 min")
    assert time_left([(4, 4, 2, [])], []) == (
        "4 trials left; none of these claims' trials has finished yet to time the 4 to train")


@pytest.mark.parametrize("df", [1, 2, 3, 4.7, 9, 30.25, 2499])
def test_the_student_t_functions_are_scipy_stats_bit_for_bit(df):
    """Verdicts and intervals read Student's t from scipy.special (scipy.stats costs a second to
    import): the same numbers, to the last bit."""
    from scipy import stats

    from orchestrator.claims import t_cdf, t_quantile

    for q in (0.5, 0.8, 0.975, 0.99, 0.9999):
        assert t_quantile(q, df) == float(stats.t.ppf(q, df))
    for x in (-7.5, -2.0, -0.1, 0.0, 0.3, 1.96, 12.0):
        assert t_cdf(x, df) == float(stats.t.cdf(x, df)) and t_cdf(-x, df) == float(stats.t.sf(x, df))
