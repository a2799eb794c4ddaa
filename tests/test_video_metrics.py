"""VSC 2022's matching-track metrics on hand-made cases, against numbers worked out by hand (the
arithmetic is written out beside each), through the functions and through `video evaluate`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.commands import towhee_isc
from towhee_isc.video.metrics import (CsvFormatError, Segment, descriptor_candidates, pair_scores, pairwise_micro_ap,
                                      read_segments, segment_ap, union_length, write_segments)

# Case A: one true pair; the first prediction finds half the copy, the second the rest and 5 s more,
# the third predicts a pair with no copy.
TRUTH_A = [Segment('q1', 'r1', 0, 10, 0, 10)]
PRED_A = [Segment('q1', 'r1', 0, 5, 0, 5, 0.9), Segment('q1', 'r1', 5, 15, 5, 15, 0.8),
          Segment('q2', 'r2', 0, 10, 0, 10, 0.7)]
# after 0.9: P = 1, R = sqrt(5/10 * 5/10) = 0.5; after 0.8: P = 10/15 on each axis, R = 1;
# after 0.7: 10 more predicted seconds on no copy, R unchanged.
AP_A = 1 * 0.5 + (10 / 15) * 0.5

# Case B: two copies in one pair (only one found), a tie of scores across pairs, a prediction that
# overlaps its pair's copy on the query axis only (so that copy does not count yet), then one that does.
TRUTH_B = [Segment('q1', 'r1', 0, 10, 20, 30), Segment('q1', 'r1', 20, 30, 40, 50), Segment('q2', 'r2', 0, 4, 0, 4)]
PRED_B = [Segment('q1', 'r1', 0, 10, 20, 25, 0.5), Segment('q2', 'r2', 0, 2, 10, 12, 0.5),
          Segment('q2', 'r2', 1, 3, 1, 3, 0.3)]
# true seconds: query 10 + 10 + 4 = 24, reference 10 + 10 + 4 = 24.
# after 0.5 (both): found query 10, reference 5; predicted query 10 + 2, reference 5 + 2.
R1, P1 = math.sqrt(10 / 24 * 5 / 24), math.sqrt(10 / 12 * 5 / 7)
# after 0.3: q2-r2's copy counts: query [0,3] of [0,4] found (3), reference [1,3] (2); predicted query
# union [0,3] (3 in all: 13), reference [10,12] + [1,3] (4 in all: 9).
R2, P2 = math.sqrt(13 / 24 * 7 / 24), math.sqrt(13 / 13 * 7 / 9)
AP_B = P1 * R1 + P2 * (R2 - R1)


def test_union_length_merges_overlapping_and_touching_intervals():
    assert union_length([(5, 7), (0, 2), (2, 3), (6, 9)]) == 3 + 4
    assert union_length([]) == 0


@pytest.mark.parametrize('truth, predictions, expected', [(TRUTH_A, PRED_A, AP_A), (TRUTH_B, PRED_B, AP_B)])
def test_segment_ap_equals_the_hand_computation(truth, predictions, expected):
    ap, curve = segment_ap(truth, list(reversed(predictions)))  # the input order does not matter
    assert ap == pytest.approx(expected, abs=1e-12)
    assert curve.recall[-1] == pytest.approx(R2 if truth is TRUTH_B else 1.0)


def test_segment_ap_is_one_for_the_truth_itself_and_zero_for_no_overlap():
    assert segment_ap(TRUTH_B, [s for s in TRUTH_B])[0] == pytest.approx(1.0)
    assert segment_ap(TRUTH_A, [Segment('q1', 'r1', 20, 30, 20, 30, 1.0)])[0] == 0.0


def test_pairwise_micro_ap_counts_ties_together_and_every_true_pair():
    truth = {('q', 'b'), ('q', 'd'), ('q', 'e')}
    predicted = {('q', 'a'): 0.9, ('q', 'b'): 0.8, ('q', 'c'): 0.8, ('q', 'd'): 0.5}
    # at 0.9: nothing found; at 0.8: 1 of 3 predictions right; at 0.5: 2 of 4; each finds 1 of 3 true pairs.
    assert pairwise_micro_ap(truth, predicted) == pytest.approx((1 / 3 + 1 / 2) / 3, abs=1e-12)
    assert pairwise_micro_ap(set(pair_scores(TRUTH_A)), pair_scores(PRED_A)) == 1.0


def test_a_pair_whose_segments_all_score_below_zero_scores_zero_as_in_vscs_scorer():
    # VSC's CandidatePair.from_matches starts each pair at 0.0: q/b (-0.2) and q/c (-0.5) tie at 0, so at
    # 0.9 one of one prediction is right, at 0 one more of three: (1 + 2/3) / 2 true pairs. Ranked by their
    # raw scores, b would come before c and score (1 + 2/2) / 2 = 1.
    segments = [Segment('q', 'a', 0, 1, 0, 1, 0.9), Segment('q', 'b', 0, 1, 0, 1, -0.2),
                Segment('q', 'c', 0, 1, 0, 1, -0.5), Segment('q', 'c', 2, 3, 2, 3, -0.7)]
    assert pair_scores(segments) == {('q', 'a'): 0.9, ('q', 'b'): 0.0, ('q', 'c'): 0.0}
    assert pairwise_micro_ap({('q', 'a'), ('q', 'b')}, pair_scores(segments)) == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)


def test_descriptor_candidates_keep_the_globally_most_similar_frame_pairs():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(6, 8)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    queries = np.stack([refs[1], -refs[4], refs[5]])  # q0's frames copy r0 and avoid r1; q1 copies r2
    q_ids, r_ids = ['q0', 'q0', 'q1'], ['r0', 'r0', 'r1', 'r1', 'r2', 'r2']
    sims = queries @ refs.T
    found = descriptor_candidates(q_ids, queries, r_ids, refs, retrieved_per_query=1, candidates_per_query=1)
    # 1 x 2 queries frame pairs kept: the two exact copies (similarity 1); 1 x 2 video pairs kept
    assert found == pytest.approx({('q0', 'r0'): sims[0, 1], ('q1', 'r2'): sims[2, 5]})


def test_video_evaluate_prints_the_hand_computed_numbers(tmp_path):
    truth, matches = tmp_path / 'truth.csv', tmp_path / 'matches.csv'
    write_segments(truth, TRUTH_B)
    write_segments(matches, PRED_B)
    result = towhee_isc('video', 'evaluate', matches, truth, '--json')
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    assert numbers['segment_ap'] == pytest.approx(AP_B, abs=1e-12)
    assert numbers['pairwise_micro_ap'] == pytest.approx(1.0)  # both true pairs tie at the top
    # Ids a spreadsheet would run as formulas (a video named '=HYPERLINK(...).mp4') are escaped, and read back as they were.
    formula = [Segment('=HYPERLINK("http://x")', '@SUM(1)', 0.0, 1.0, 0.0, 1.0, 0.5)]
    write_segments(matches, formula)
    assert matches.read_text().splitlines()[1].startswith('"\'=HYPERLINK(""http://x"")",\'@SUM(1),')
    assert read_segments(matches) == formula
    truth.write_text('query_id,ref_id,query_start\nq1,r1,0\n')  # the command prints this as its one error line
    with pytest.raises(CsvFormatError, match=r'lacks the column\(s\) query_end,ref_start,ref_end'):
        read_segments(truth, ground_truth=True)
