"""The grain pipeline on real annotation output: shapes, determinism, process slices, pixels, corruption."""
import dataclasses
import pathlib

import numpy as np
import open_clip
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from annotate.synth import synthesize, write_truth_records
from conftest import run_cli, two_processes
from zoomin_jax import records
from zoomin_jax.batch_layout import LAYOUTS, batch_arrays, example_arrays
from zoomin_jax.data import samples
from zoomin_jax.data.pipeline import SKIPPED, build_index, make_dataset
from zoomin_jax.data.source import RecordSource
from zoomin_jax.errors import UserError
from zoomin_jax.image_transform import eval_uint8, normalize

CFG = samples.SampleConfig(image_size=64, patch_size=8, max_panels=3, max_regions=2)


def batch_at(dataset, k: int = 0) -> dict:
    """Batch k of a dataset, without the count of skipped records (not a batch_layout array)."""
    iterator = iter(dataset)
    for _ in range(k):
        next(iterator)
    batch = next(iterator)
    assert (batch.pop(SKIPPED) == 0).all()
    return batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """annotate synth -> annotate run --backend heuristic, and the synth ground truth as records."""
    root = tmp_path_factory.mktemp("data")
    synthesize(root / "synth", num=16, seed=21)
    run_cli("-m", "annotate", "run", "--input", str(root / "synth" / "manifest.jsonl"), "--out", str(root / "run"))
    return {"heuristic": str(root / "run" / "records-*.array_record"),
            "truth": str(write_truth_records(root / "synth"))}


def test_one_batch_per_level(shards):
    """Every level's examples and packed batches are what batch_layout describes: the same keys,
    shapes and dtypes; packed, the same children in the same order as in their slots."""
    dims = samples.dims(CFG)
    packed_dims = dataclasses.replace(dims, shards=2, packed=(("figure", 6),))  # panel: every slot
    for level, source in (("figure", "heuristic"), ("panel", "truth"), ("region", "truth")):
        examples = batch_at(make_dataset(shards[source], level, 4, cfg=CFG))
        layout = {key: ((4, *array.shape), array.dtype) for key, array in example_arrays(level, dims).items()}
        assert {key: (value.shape, value.dtype) for key, value in examples.items()} == layout, level
        slots = packed_dims.slots_per_shard(level, 4)
        batch = batch_at(make_dataset(shards[source], level, 4, cfg=CFG, pack_children=(2, slots)))
        layout = {key: (array.shape, array.dtype) for key, array in batch_arrays(level, 4, packed_dims).items()}
        assert {key: (value.shape, value.dtype) for key, value in batch.items()} == layout, level
        if level != "region":
            child = LAYOUTS[level].child
            assert batch[f"{child}_dropped"].sum() == 0
            np.testing.assert_array_equal(batch[f"{child}_images"][batch[f"{child}_parent"] >= 0],
                                          examples[f"{child}_images"][examples[f"{child}_mask"]])
    figure = batch_at(make_dataset(shards["heuristic"], "figure", 4, cfg=CFG))
    assert figure["image"].shape == (4, 64, 64, 3) and figure["image"].dtype == np.uint8
    assert figure["panel_images"].shape == (4, 3, 64, 64, 3) and figure["panel_tokens"].shape == (4, 3, 77)
    assert figure["text_id"].shape == (4,) and figure["panel_text_id"].shape == (4, 3)
    assert figure["text_id"].dtype == figure["panel_text_id"].dtype == np.int32
    assert figure["panel_mask"].any(axis=1).all() and (figure["tokens"][:, 0] == 49406).all()
    # Padded slots are empty.
    assert (figure["panel_images"][~figure["panel_mask"]] == 0).all()
    panel = batch_at(make_dataset(shards["truth"], "panel", 4, cfg=CFG))
    assert panel["region_images"].shape == (4, 2, 64, 64, 3) and panel["region_grid_boxes"].shape == (4, 2, 4)
    region = batch_at(make_dataset(shards["truth"], "region", 4, cfg=CFG))
    assert region["image"].shape == (4, 64, 64, 3) and region["tokens"].shape == (4, 77)
    with pytest.raises(UserError, match="no region-level items"):  # every box below the minimum side
        make_dataset(shards["heuristic"], "region", 4, cfg=dataclasses.replace(CFG, min_box_side=10_000))


def test_decoded_image_cache_gives_the_same_batches(shards):
    """Two epochs of training views: the second one takes every image from the cache."""
    cfg = dataclasses.replace(CFG, train=True)
    plain = list(make_dataset(shards["truth"], "panel", 2, seed=5, cfg=cfg, num_epochs=2))
    cached = list(make_dataset(shards["truth"], "panel", 2, seed=5, cfg=cfg, num_epochs=2, cached_images=64))
    assert len(plain) == len(cached) > 4
    for a, b in zip(plain, cached):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_batches_other_seed_other_order(shards):
    first = [batch_at(make_dataset(shards["truth"], "panel", 2, seed=5, cfg=CFG), n) for n in range(3)]
    again = [batch_at(make_dataset(shards["truth"], "panel", 2, seed=5, cfg=CFG), n) for n in range(3)]
    other = [batch_at(make_dataset(shards["truth"], "panel", 2, seed=6, cfg=CFG), n) for n in range(3)]
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_are_disjoint_cover_every_item_once_and_hold_only_their_share(shards, process_count):
    source = RecordSource(shards["truth"])
    whole = build_index(source, "region", CFG)
    slices = [build_index(source, "region", CFG, process_index=p, process_count=process_count)
              for p in range(process_count)]
    rows = [tuple(r) for index in slices for r in index.rows]
    assert sorted(rows) == sorted(map(tuple, whole.rows)) and len(rows) == len(set(rows))
    assert [len(index.rows) for index in slices] == [len(range(p, whole.total, process_count))
                                                     for p in range(process_count)]
    assert all(index.rows.dtype == np.int32 and index.total == whole.total for index in slices)
    np.testing.assert_array_equal(slices[0].child_histogram, whole.child_histogram)  # of all processes' items


def test_region_pixels_match_open_clip_on_the_pil_crop(shards):
    source = RecordSource(shards["truth"])
    record = next(r for r in (source[i] for i in range(len(source))) if r["regions"])
    example = samples.region_example(record, 0, samples.SampleConfig(), np.random.default_rng(0))
    x0, y0, x1, y1 = record["regions"][0]["box"]
    dx, dy = (x1 - x0) * 0.1, (y1 - y0) * 0.1
    image = samples.decode_image(record)
    pil_crop = image.crop((max(0, round(x0 - dx)), max(0, round(y0 - dy)),
                           min(image.width, round(x1 + dx)), min(image.height, round(y1 + dy))))
    expected = open_clip.image_transform(224, is_train=False)(pil_crop).numpy().transpose(1, 2, 0)
    assert np.abs(normalize(example["image"]) - expected).max() <= 1e-5


def test_corrupt_record_strict_names_it_default_skips_and_counts(tmp_path, shards):
    good = list(records.iter_records(shards["truth"]))[:3]
    path = tmp_path / "records-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(records.encode(good[0]))
    writer.write(b"\x93 not msgpack \xff")
    writer.write(records.encode(good[1]))
    writer.close()
    with pytest.raises(UserError, match=f"{path} record 1 is not a msgpack figure record"):
        build_index(RecordSource(str(path), strict=True), "figure", CFG)
    index = build_index(RecordSource(str(path)), "figure", CFG)
    assert index.skipped_records == 1 and len(index.rows) == 2
    assert batch_at(make_dataset(str(path), "figure", 2, cfg=CFG, index=index))["image"].shape == (2, 64, 64, 3)


def bad_records_shard(tmp_path, shards) -> str:
    """A shard whose index lists 4 figures: two good, one whose PNG is cut short, one whose record
    bytes are (written whole, then damaged: the index was written before)."""
    good = list(records.iter_records(shards["truth"]))[:3]
    path = tmp_path / "records-00000-of-00001.array_record"
    cut_image = dict(good[2], figure_id="cut-image", image_bytes=good[2]["image_bytes"][:200])
    with records.RecordWriter(path) as writer:
        writer.write(good[0])
        writer.write(cut_image)
        data = records.encode(good[2])
        writer.write_encoded(data[:len(data) // 2], records.index_entry(good[2]))
        writer.write(good[1])
    return str(path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_records_under_workers_are_skipped_and_counted(tmp_path, shards, num_workers):
    path = bad_records_shard(tmp_path, shards)
    batches = list(make_dataset(path, "figure", 2, cfg=CFG, shuffle=False, num_epochs=4, workers=num_workers))
    # 8 good examples in 4 batches. In order, the two bad records precede every second good one: 2 an
    # epoch. Two workers take every other example each (grain slices the stream): the one with the cut
    # record ends on it, which no later example counts.
    assert len(batches) == 4 and all(batch["image"].shape == (2, 64, 64, 3) for batch in batches)
    assert sum(int(batch[SKIPPED].sum()) for batch in batches) == (8 if num_workers == 0 else 7)


def test_bad_records_under_workers_stop_a_strict_run_naming_them(tmp_path, shards):
    path = bad_records_shard(tmp_path, shards)
    iterator = iter(make_dataset(path, "figure", 2, cfg=CFG, shuffle=False, strict=True, workers=2))
    with pytest.raises(Exception, match=f"{path} record [12] (has an undecodable image|is not a msgpack figure record)"):
        next(iterator)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no record shards match"):
        RecordSource(str(tmp_path / "nothing-*.array_record"))
    with pytest.raises(UserError, match="no record shards match"):
        RecordSource(str(tmp_path))  # a directory without shards


def test_a_directory_means_its_shards(shards):
    """annotate run's --out directory holds the shards beside its other files (the run's manifest)."""
    directory = str(pathlib.Path(shards["heuristic"]).parent)
    assert RecordSource(directory).paths == RecordSource(shards["heuristic"]).paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_in_a_fresh_process(tmp_path, shards, num_workers):
    for phase in ("save", "restore"):
        run_cli("tests/data_resume.py", phase, shards["truth"], str(tmp_path), str(num_workers))
    expected, restored = np.load(tmp_path / "expected.npz"), np.load(tmp_path / "restored.npz")
    assert sorted(expected.files) == sorted(restored.files)
    for key in expected.files:
        np.testing.assert_array_equal(expected[key], restored[key])


def images(dataset, batches: int | None = None) -> list[bytes]:
    """Each example's pixels, batch after batch: a signature of the example and its random draws."""
    iterator = iter(dataset)
    taken = iterator if batches is None else (next(iterator) for _ in range(batches))
    return [bytes(image) for batch in taken for image in batch["image"]]


def test_epochs_reshuffle(shards):
    one = images(make_dataset(shards["truth"], "region", 1, seed=3, cfg=CFG, num_epochs=2))
    n = len(one) // 2
    assert sorted(one[:n]) == sorted(one[n:]) and one[:n] != one[n:]


@pytest.mark.parametrize("level", ["panel", "region"])
def test_global_batches_and_draws_do_not_depend_on_the_process_count(shards, level):
    """With 6 data shards, global batch k of 1, 2 or 3 processes (their local batches in process order)
    holds the same examples with the same crops, children and text draws, epoch after epoch."""
    cfg = dataclasses.replace(CFG, train=True)

    def global_batches(processes: int) -> list[bytes]:
        local = [images(make_dataset(shards["truth"], level, 12 // processes, seed=5, cfg=cfg, num_epochs=None,
                                     process_index=p, process_count=processes, data_shards=6), batches=4)
                 for p in range(processes)]
        per_batch = 12 // processes
        return [x for k in range(4) for p in range(processes) for x in local[p][k * per_batch:(k + 1) * per_batch]]

    one = global_batches(1)
    assert global_batches(2) == one == global_batches(3)
    assert len(set(one)) > 12  # 4 batches of 12 over more than one epoch of some shards: not one example repeated
    plain = images(make_dataset(shards["truth"], level, 12, seed=5, cfg=CFG, num_epochs=None, data_shards=6), 4)
    assert sorted(plain) != sorted(one)  # the draws are random crops


def test_workers_make_the_batches_one_process_makes(shards):
    """grain's workers take whole batches: two data shards, two workers, the same batches in order."""
    cfg = dataclasses.replace(CFG, train=True)
    made = [make_dataset(shards["truth"], "panel", 4, seed=5, cfg=cfg, num_epochs=None, data_shards=2, workers=workers)
            for workers in (0, 2)]
    assert images(made[0], batches=5) == images(made[1], batches=5)


def test_a_process_batch_must_split_into_its_data_shards(shards):
    with pytest.raises(UserError, match="not a multiple of the 4 processes"):
        make_dataset(shards["truth"], "panel", 4, process_count=4, data_shards=6, num_epochs=None)
    with pytest.raises(UserError, match="does not split into this process's 3 data shards"):
        make_dataset(shards["truth"], "panel", 4, data_shards=3, num_epochs=None)


def test_global_batch_is_sharded_over_the_data_axes(shards):
    import jax
    from jax.sharding import AxisType

    from zoomin_jax.data.device import to_global
    assert jax.device_count() == 8, "make test runs with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    local = batch_at(make_dataset(shards["truth"], "panel", 8, cfg=CFG))
    batch = to_global(local, mesh, data_axes=("data", "fsdp"))
    assert batch["image"].shape == (8, 64, 64, 3) and len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(np.asarray(batch["region_grid_boxes"]), local["region_grid_boxes"])


def test_training_views_are_random_resized_crops_without_flips(shards):
    train = samples.SampleConfig(image_size=64, patch_size=8, max_regions=2, train=True, crop_scale=(0.3, 0.6))
    a = batch_at(make_dataset(shards["truth"], "panel", 4, seed=1, cfg=train))
    b = batch_at(make_dataset(shards["truth"], "panel", 4, seed=1, cfg=train))
    np.testing.assert_array_equal(a["image"], b["image"])
    shown = batch_at(make_dataset(shards["truth"], "panel", 4, seed=1, cfg=CFG, shuffle=False))
    random = batch_at(make_dataset(shards["truth"], "panel", 4, seed=1, cfg=train, shuffle=False))
    assert not np.array_equal(shown["image"], random["image"])
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y, w, h = samples.random_rect(400, 200, rng, train)
        assert 0 <= x and x + w <= 400 and 0 <= y and y + h <= 200
        assert 0.3 * 0.97 <= w * h / 80000 <= 0.6 * 1.03


def test_panel_text_mixes_in_lvlm_descriptions():
    panel = {"text": "(A) PAS stain.", "text_lvlm": "A kidney section."}
    always = samples.SampleConfig(lvlm_text_prob=1.0)
    rng = np.random.default_rng(0)
    assert samples.panel_text(panel, always, rng) == "A kidney section."
    assert samples.panel_text(panel, always, None) == "(A) PAS stain."  # evaluation: the sub-caption
    assert samples.panel_text(dict(panel, text_lvlm=""), always, rng) == "(A) PAS stain."
    half = samples.SampleConfig(lvlm_text_prob=0.5)
    picks = [samples.panel_text(panel, half, rng) for _ in range(400)]
    assert 150 < picks.count("A kidney section.") < 250


def test_two_processes_assemble_one_global_batch(tmp_path, shards):
    results = two_processes("data_multiprocess.py", shards["truth"], out=tmp_path)
    assert all(r["global_shape"] == [8, 32, 32, 3] for r in results)
    # The global batch is process 0's slice followed by process 1's, seen identically by both.
    expected = results[0]["local_signature"] + results[1]["local_signature"]
    assert results[0]["global_signature"] == results[1]["global_signature"] == expected
    assert results[0]["local_signature"] != results[1]["local_signature"]


def test_bench_prints_rates_and_where_the_time_goes(shards):
    out = run_cli("-m", "zoomin_jax.data.bench", "--records", shards["truth"], "--level", "panel", "--workers", "0",
                  "--batch-size", "4", "--batches", "2", "--repeats", "2", "--image-size", "64", "--breakdown").stdout
    rate, shares = out.strip().splitlines()[-2:]
    assert rate.startswith("level=panel views=train workers=0 read_threads=16 latency_ms=0 samples/s median=")
    stages = dict(part.rsplit(" ", 1) for part in shares.split("time: ")[1].split(", "))
    assert list(stages) == ["read record", "decode image", "crop", "convert", "resize", "tokenize", "other"]
    percent = {stage: float(share.rstrip("%")) for stage, share in stages.items()}
    assert abs(sum(percent.values()) - 100) <= len(percent) and percent["decode image"] > 0


def ramp_image(width: int, height: int) -> Image.Image:
    """Red = x / 2, green = y / 2: a view's pixels say which part of the image it shows."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x // 2, y // 2, np.full_like(x, 128)], -1).astype(np.uint8))


def hand_record(panels, regions=(), caption="A figure.", context=()) -> dict:
    """A figure record's fields that samples reads, from panel boxes and (panel, box, text) regions."""
    return {"caption": caption, "context": list(context),
            "panels": [{"panel_id": n, "box": list(box), "text": f"panel {n}", "text_lvlm": "", "kind": "photo"}
                       for n, box in enumerate(panels)],
            "regions": [{"panel_id": panel, "box": list(box), "text_sub": text, "text_lvlm": ""}
                        for panel, box, text in regions]}


def test_region_boxes_in_the_panel_grid_are_the_region_crops_by_hand():
    """Panel 400x200 at (100, 50): its eval view (448x224, 112 px cut on the left) shows image x
    200..400, y 50..250 at 1.12 px per pixel, 0.08 tokens of 14 px. Region 1 (56 px) with its 10%
    margin is the crop (294, 94, 362, 162); region 2 has 75% of its box in view, its crop is cut at
    x = 400, and its eval view shows the centre 34x34 of that 34x48 crop; region 3 is 37.5% in view:
    not paired; region 4 has no text: the caption."""
    record = hand_record([(100, 50, 500, 250)], [(0, (300, 100, 356, 156), "arrow"), (0, (370, 150, 410, 190), "star"),
                                                 (0, (385, 100, 425, 140), "cut"), (0, (250, 60, 290, 100), "")])
    image = ramp_image(600, 300)
    example = samples.panel_example(record, 0, samples.SampleConfig(), image=image)
    assert example["region_mask"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(example["region_grid_boxes"][:3], [
        [94 * 0.08, 44 * 0.08, 162 * 0.08, 112 * 0.08],
        [166 * 0.08, (170 - 17 - 50) * 0.08, 16.0, (170 + 17 - 50) * 0.08],
        [(246 - 200) * 0.08, (56 - 50) * 0.08, (294 - 200) * 0.08, (104 - 50) * 0.08]], atol=2e-3)
    np.testing.assert_array_equal(example["region_images"][1], eval_uint8(image.crop((366, 146, 400, 194))))
    assert example["region_text_id"][:3].tolist() == samples.text_ids(["arrow", "star", "A figure."]).tolist()
    assert example["text_id"] == samples.text_ids(["panel 0"])[0]


@pytest.mark.parametrize("train", [False, True])
def test_roi_boxes_cover_what_the_region_crops_show(train):
    """On a ramp image, the panel-view pixels under each ROI box span the same x and y as the region
    crop's own view (within about a pixel), in eval views and random crops."""
    image = ramp_image(510, 510)
    regions = [(0, (x, y, x + w, y + h), "r") for x, y, w, h in
               [(20, 30, 120, 100), (300, 40, 150, 150), (200, 250, 100, 140), (400, 300, 99, 90), (60, 280, 130, 110)]]
    record = hand_record([(10, 10, 500, 430)], regions)
    cfg = samples.SampleConfig(max_regions=5, train=train, crop_scale=(0.6, 1.0))
    checked = 0
    for seed in range(4):
        example = samples.panel_example(record, 0, cfg, np.random.default_rng(seed), image)
        for box, region, valid in zip(example["region_grid_boxes"], example["region_images"], example["region_mask"]):
            if not valid:
                continue
            x0, y0, x1, y1 = box * 14
            columns = (np.arange(224) + 0.5 >= x0) & (np.arange(224) + 0.5 < x1)
            rows = (np.arange(224) + 0.5 >= y0) & (np.arange(224) + 0.5 < y1)
            under = example["image"][rows][:, columns].astype(float)
            for channel in (0, 1):  # red follows x, green y
                shown, pooled = region[..., channel].astype(float), under[..., channel]
                assert abs(shown.mean() - pooled.mean()) <= 1.0
                assert abs(np.ptp(shown) - np.ptp(pooled)) <= 2.5
            checked += 1
    assert checked >= 12


def test_a_figure_is_paired_with_the_panels_its_view_shows():
    """A 300x100 figure's eval view shows x 100..200: panel 1 wholly, panel 3 by 60% (its crop cut to
    the view), panels 0 and 2 by 23%: not paired."""
    image = ramp_image(300, 100)
    record = hand_record([(0, 0, 130, 100), (130, 0, 170, 100), (170, 0, 300, 100), (60, 0, 160, 50)])
    example = samples.figure_example(record, samples.SampleConfig(max_panels=4), image=image)
    assert example["panel_mask"].tolist() == [True, True, False, False]
    assert example["panel_text_id"][:2].tolist() == samples.text_ids(["panel 1", "panel 3"]).tolist()
    np.testing.assert_array_equal(example["panel_images"][1], eval_uint8(image.crop((100, 0, 160, 50))))


def test_children_beyond_the_maximum_are_sampled_not_cut():
    """8 panels, 3 slots: each draw holds 3 distinct panels in order, a seed gives the same ones, and
    the draws reach every panel."""
    record = hand_record([(x, y, x + 100, y + 200) for y in (0, 200) for x in (0, 100, 200, 300)])
    image, cfg = ramp_image(400, 400), samples.SampleConfig(max_panels=3)
    ids = samples.text_ids([f"panel {n}" for n in range(8)]).tolist()
    seen = set()
    for seed in range(30):
        drawn = samples.figure_example(record, cfg, np.random.default_rng(seed), image)["panel_text_id"].tolist()
        positions = [ids.index(i) for i in drawn]
        assert positions == sorted(set(positions)) and len(positions) == 3
        seen |= set(positions)
    assert seen == set(range(8))
    again = [samples.figure_example(record, cfg, np.random.default_rng(5), image)["panel_text_id"] for _ in range(2)]
    np.testing.assert_array_equal(*again)


def test_epochs_draw_other_children(shards):
    """Through the pipeline: the second epoch's figure examples pair other panels (figures with more
    panels than the 2 slots)."""
    cfg = dataclasses.replace(CFG, max_panels=2)
    epochs = list(make_dataset(shards["truth"], "figure", 16, cfg=cfg, shuffle=False, num_epochs=2))
    assert len(epochs) == 2
    first, second = (epoch["panel_text_id"] for epoch in epochs)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(epochs[0]["text_id"], epochs[1]["text_id"])


def test_figure_text_mixes_in_citing_paragraphs():
    record = hand_record([], caption="Fig. 1. Kidney.", context=["As Fig. 1 shows, the kidney...", ""])
    always, rng = samples.SampleConfig(context_text_prob=1.0), np.random.default_rng(0)
    assert samples.figure_text(record, always, rng) == "As Fig. 1 shows, the kidney..."  # never the empty one
    assert samples.figure_text(record, always, None) == "Fig. 1. Kidney."  # evaluation: the caption
    assert samples.figure_text(dict(record, context=[]), always, rng) == "Fig. 1. Kidney."
    assert samples.figure_text(record, samples.SampleConfig(), rng) == "Fig. 1. Kidney."  # the default: captions
    half = samples.SampleConfig(context_text_prob=0.5)
    picks = [samples.figure_text(record, half, rng) for _ in range(400)]
    assert 150 < picks.count("Fig. 1. Kidney.") < 250


def test_identical_texts_have_one_id():
    ids = samples.text_ids(["Scale bar, 50 µm.", "(A) PAS stain.", "Scale bar, 50 µm."])
    assert ids.dtype == np.int32 and ids[0] == ids[2] != ids[1]


def test_the_crop_fallback_is_torchvisions():
    """A 1000x100 strip fits no crop of 90% of its area at ratios 3/4..4/3: torchvision then takes the
    central crop of the full height at the widest allowed ratio."""
    import torch
    from torchvision.transforms import RandomResizedCrop
    train = samples.SampleConfig(train=True)
    rect = samples.random_rect(1000, 100, np.random.default_rng(0), train)
    top, left, height, width = RandomResizedCrop.get_params(torch.zeros(3, 100, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    assert rect == (float(left), float(top), float(width), float(height)) == (433.0, 0.0, 133.0, 100.0)
