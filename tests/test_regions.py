"""Each region fusion rule on hand-computed cases."""
import pytest

from annotate.config import AnnotateConfig
from annotate.regions import dilate, fuse_regions, is_degenerate, non_max_suppression, within_gate

CFG = AnnotateConfig()
PANEL = [0, 0, 100, 100]  # diagonal 141.42; tau 0.25 -> 35.36 px


def test_gate_uses_centre_distance_over_panel_diagonal():
    assert within_gate([40, 40, 60, 60], [65, 65, 75, 75], PANEL, 0.25)      # 28.3 px
    assert not within_gate([40, 40, 60, 60], [75, 75, 85, 85], PANEL, 0.25)  # 42.4 px
    assert within_gate([40, 40, 60, 60], [75, 75, 85, 85], [0, 0, 200, 200], 0.25)  # 42.4 <= 70.7


def test_dilation_about_the_centre():
    assert dilate([10, 10, 20, 30], 3.0) == [0.0, -10.0, 30.0, 50.0]


def test_degenerate_boxes():
    big = [0, 0, 1000, 1000]  # min area 0.002 * 1e6 = 2000 px^2
    assert is_degenerate([0, 0, 5, 50], big, CFG)        # side 5 < 8
    assert is_degenerate([0, 0, 100, 12], big, CFG)      # aspect 8.3 > 8
    assert is_degenerate([0, 0, 40, 40], big, CFG)       # 1600 < 2000
    assert not is_degenerate([0, 0, 50, 50], big, CFG)   # 2500


def test_nms_keeps_the_best_of_overlapping_boxes():
    regions = [{"box": [0, 0, 10, 10], "score": 0.5}, {"box": [1, 1, 11, 11], "score": 0.9},  # IoU 0.68
               {"box": [5, 0, 15, 10], "score": 0.4}]  # IoU 0.33 with the best
    assert [r["score"] for r in non_max_suppression(regions, 0.5)] == [0.9, 0.4]


def test_nms_within_identifier_groups():
    proposals = [{"box": [0, 0, 100, 100], "score": 1.0, "label": "A"},   # scale 1.0
                 {"box": [2, 2, 98, 101], "score": 0.5, "label": "A"},    # scale 0.75, same panel
                 {"box": [5, 5, 100, 100], "score": 0.5, "label": "B"}]   # overlaps A, other identifier
    kept = non_max_suppression(proposals, 0.5, group_by="label")
    assert sorted((p["label"], p["score"]) for p in kept) == [("A", 1.0), ("B", 0.5)]


def test_fusion_paths():
    panel = [100, 0, 300, 200]  # diagonal 282.8 -> gate 70.7 px
    markers = [{"box": [150, 50, 160, 60], "kind": "arrow", "score": 0.9},     # claimed by the phrase
               {"box": [270, 170, 280, 180], "kind": "asterisk", "score": 0.8}]  # unclaimed -> dilated
    phrases = [{"box": [160, 40, 220, 100], "text": "apoptotic nuclei", "score": 1.0},  # 36 px from arrow
               {"box": [100, 150, 130, 200], "text": "far away", "score": 1.0}]          # gated out
    regions = fuse_regions(panel, markers, phrases, CFG)
    assert [(r["source"], r["marker_kind"], r["text_sub"]) for r in regions] == [
        ("fused", "arrow", "apoptotic nuclei"), ("marker", "asterisk", "")]
    fused, marker = regions
    assert fused["box"] == [160.0, 40.0, 220.0, 100.0] and abs(fused["score"] - 0.9) < 1e-12
    assert fused["marker_box"] == [150, 50, 160, 60]
    # Dilated 3x about (275, 175) -> [260, 160, 290, 190], inside the panel.
    assert marker["box"] == [260.0, 160.0, 290.0, 190.0]


def caption_regions(policy: str, verified: bool | None, markers=()) -> list[tuple]:
    phrase = {"box": [80, -20, 160, 60], "text": "x", "score": 1.0, "description": "a dark cell"}
    if verified is not None:
        phrase["verified"] = verified
    regions = fuse_regions([100, 0, 300, 200], list(markers), [phrase],
                           AnnotateConfig(caption_boxes_without_markers=policy))
    return [(r["source"], r["box"], r["text_lvlm"]) for r in regions]


CAPTION_REGION = ("caption", [100.0, 0.0, 160.0, 60.0], "a dark cell")  # clipped to its panel


@pytest.mark.parametrize("policy,verified,kept", [
    ("verify", True, [CAPTION_REGION]),   # the default: kept once a second look confirmed it
    ("verify", False, []),                # looked at, not shown
    ("verify", None, []),                 # never looked at: no evidence at all
    ("keep", None, [CAPTION_REGION]),
    ("keep", False, [CAPTION_REGION]),
    ("drop", True, []),
])
def test_phrase_boxes_of_a_panel_without_markers_follow_the_policy(policy, verified, kept):
    assert caption_regions(policy, verified) == kept


def test_the_marker_gate_not_the_policy_decides_where_a_panel_has_markers():
    asterisk = {"box": [120, 10, 130, 20], "kind": "asterisk", "score": 1.0}
    far = {"box": [280, 180, 290, 190], "kind": "asterisk", "score": 1.0}
    for policy in ("verify", "drop"):  # near a marker: fused, verified or not, with the phrase's description
        assert caption_regions(policy, None, [asterisk]) == [("fused", [100.0, 0.0, 160.0, 60.0], "a dark cell")]
    # Gated out by the only marker, even a confirmed box is not a region; the marker is (dilated 3x).
    assert caption_regions("keep", True, [far]) == [("marker", [270.0, 170.0, 300.0, 200.0], "")]
    far["description"] = "a star"
    assert caption_regions("verify", True, [far])[0][2] == "a star"


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="caption_boxes_without_markers is 'sometimes'; use one of verify, keep, drop"):
        AnnotateConfig(caption_boxes_without_markers="sometimes")


def test_an_arrow_with_a_tip_marks_what_it_points_at():
    panel = [0, 0, 400, 300]
    arrow = {"box": [100, 100, 140, 130], "tip": [140, 130], "kind": "arrow", "score": 0.9}
    [region] = fuse_regions(panel, [arrow], [], CFG)
    assert region["box"] == [120, 110, 160, 150]  # a square as long as the arrow, centred on the tip
    assert region["marker_box"] == arrow["box"] and region["source"] == "marker"
    [plain] = fuse_regions(panel, [{"box": arrow["box"], "kind": "asterisk", "score": 0.9}], [], CFG)
    assert plain["box"] == dilate(arrow["box"], CFG.marker_dilation)  # no tip: the marker dilated
