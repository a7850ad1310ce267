"""The planner (train/budget.py): what a run will process, decided up front from the split sizes and
the backbone's measured speed so that the whole run fits its budget. Bounds on what it decides, never
on wall-clock time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train import budget
from train.budget import Sizes, plan_run
from train.config import TrainConfig

# clothing-small (train/ + validation/, the 15% hold-out carved from train) and its ten-times copy
SMALL = Sizes(train=2608, validation=341, test=460, classes=10)
TEN_TIMES = Sizes(train=26069, validation=3410, test=4601, classes=10)
VGG16_BF16_S = 0.092  # seconds an image through the prefix, measured on a 2-core Zen 4 (docs/training.md)


def cfg(**kw: object) -> TrainConfig:
    return TrainConfig(data=Path("unused"), precision="bfloat16", **kw)  # type: ignore[arg-type]


def room(c: TrainConfig) -> float:
    return max(0.0, c.time_budget_min * 60 - budget.fixed_s(budget.VGG16_PARAMS))


def test_no_budget_takes_everything_as_asked() -> None:
    plan = plan_run(TEN_TIMES, VGG16_BF16_S, cfg(time_budget_min=0, augment_copies=2), cached=True)
    assert (plan.copies, plan.train_images, plan.validation_images, plan.test_images) == (2, 26069, 3410, 4601)
    assert plan.variant_images == 4601 and plan.calibration_images == 300 and plan.notes == []


def test_the_readme_run_on_clothing_small_is_not_cut() -> None:
    """The default command's data fits its 30 minutes as it is: the plan changes nothing."""
    c = cfg()
    plan = plan_run(SMALL, VGG16_BF16_S, c, cached=True, previous=True)
    assert (plan.copies, plan.train_images, plan.validation_images, plan.test_images) == (1, 2608, 341, 460)
    assert plan.variant_images == 460 and plan.calibration_images == 300 and plan.notes == []
    assert plan.estimate_s["features"] == pytest.approx(VGG16_BF16_S * (2 * 2608 + 341))


def test_the_ten_times_copy_is_cut_to_fit_and_says_so() -> None:
    c = cfg()
    plan = plan_run(TEN_TIMES, VGG16_BF16_S, c, cached=True, previous=True)
    r = room(c)
    assert plan.copies == 0
    assert 10 * budget.MIN_TRAIN_PER_CLASS < plan.train_images < TEN_TIMES.train
    assert budget.MIN_VALIDATION_IMAGES <= plan.validation_images < TEN_TIMES.validation
    assert budget.MIN_TEST_IMAGES <= plan.test_images < TEN_TIMES.test
    assert plan.variant_images <= plan.test_images
    # what it keeps fits the shares, and training keeps at least the third left
    assert plan.estimate_s["features"] <= budget.FEATURES_SHARE * r
    after = plan.estimate_s["evaluation"] + plan.estimate_s["compare"] + plan.estimate_s["variants"]
    assert after <= budget.AFTER_SHARE * r
    assert plan.after_s == pytest.approx(after + budget.fixed_s(budget.VGG16_PARAMS))
    assert r - plan.estimate_s["features"] - after >= r / 3
    said = " ".join(plan.notes)
    for what in ("augmented copies 1 -> 0", "training images 26069 ->", "validation images 3410 ->",
                 "test images 4601 ->"):
        assert what in said, plan.notes


def test_copies_go_before_training_images() -> None:
    """Where dropping the augmented copy is enough, every training image is kept."""
    c = cfg(time_budget_min=30, augment_copies=1)
    s = budget.FEATURES_SHARE * room(c) / (1.5 * SMALL.train + SMALL.validation)  # two copies do not fit, one does
    plan = plan_run(SMALL, s, c, cached=True)
    assert plan.copies == 0 and plan.train_images == SMALL.train


def test_the_variants_sample_goes_before_the_evaluated_test_images() -> None:
    c = cfg(time_budget_min=30)
    after = budget.AFTER_SHARE * room(c)
    # evaluation of all fits alone; with the variants on all it does not
    s = after / (budget.evaluation_s(1.0, SMALL.test, c) + 1.5 * SMALL.test + 1.6 * 300 + 1)
    s *= 1.4
    plan = plan_run(SMALL, s, c, cached=True)
    assert plan.test_images == SMALL.test and plan.variant_images < SMALL.test
    assert any("variants scored on" in n for n in plan.notes)


def test_without_variants_nothing_is_cut_for_them() -> None:
    c = cfg(variants=False)
    plan = plan_run(TEN_TIMES, VGG16_BF16_S, c, cached=True)
    assert plan.estimate_s["variants"] == 0 and not any("variants" in n for n in plan.notes)


def test_end_to_end_training_has_no_feature_stage_to_cut() -> None:
    plan = plan_run(TEN_TIMES, VGG16_BF16_S, cfg(), cached=False)
    assert plan.copies == 0 and plan.train_images == TEN_TIMES.train and plan.estimate_s["features"] == 0


@settings(max_examples=300, deadline=None)
@given(train=st.integers(1, 200_000), validation=st.integers(1, 20_000), test=st.integers(1, 20_000),
       classes=st.integers(2, 100), s=st.floats(1e-5, 2.0), minutes=st.floats(0.1, 600),
       copies=st.integers(0, 3), previous=st.booleans(), variants=st.booleans())
def test_the_plan_fits_its_shares_unless_at_a_floor(train: int, validation: int, test: int, classes: int,
                                                    s: float, minutes: float, copies: int, previous: bool,
                                                    variants: bool) -> None:
    c = cfg(time_budget_min=minutes, augment_copies=copies, variants=variants)
    sizes = Sizes(train, validation, test, classes)
    plan = plan_run(sizes, s, c, cached=True, previous=previous)
    r = room(c)
    # never more than there is, never less than a floor allows
    assert 0 <= plan.copies <= copies
    assert min(train, budget.MIN_TRAIN_PER_CLASS * classes) <= plan.train_images <= train
    assert min(validation, budget.MIN_VALIDATION_IMAGES) <= plan.validation_images <= validation
    assert min(test, budget.MIN_TEST_IMAGES) <= plan.test_images <= test
    assert plan.variant_images <= plan.test_images
    assert min(300, budget.MIN_CALIBRATION_IMAGES) <= plan.calibration_images <= 300
    # the features fit their share, or nothing more could be cut from them
    at_floor = plan.copies == 0 and plan.train_images == min(train, budget.MIN_TRAIN_PER_CLASS * classes)
    assert plan.estimate_s["features"] <= budget.FEATURES_SHARE * r + 1e-6 or at_floor
    # what follows training fits its share, or the test images are at their floor
    after = plan.estimate_s["evaluation"] + plan.estimate_s["compare"] + plan.estimate_s["variants"]
    floors = plan.test_images == min(test, budget.MIN_TEST_IMAGES)
    assert after <= budget.AFTER_SHARE * r + 1e-6 or floors
    # anything cut is said
    cut = (plan.copies < copies or plan.train_images < train or plan.validation_images < validation
           or plan.test_images < test or (variants and plan.variant_images < plan.test_images)
           or plan.calibration_images < 300)
    assert bool(plan.notes) == cut


@pytest.mark.slow
def test_a_run_far_over_its_budget_is_planned_down_and_does_what_it_planned(tmp_path: Path, clothing: Path) -> None:
    """A quarter of a minute for VGG16 on clothing-small: nothing is left once export is counted, so the
    plan takes every floor; the run then processes exactly what was planned, evaluation and variants
    included, and the epochs stop at the budget (a bound on what was decided, not on the clock)."""
    from train.pipeline import run

    result = run(TrainConfig(data=clothing, store=tmp_path, name="vgg", backbone="vgg16", weights="none",
                             image_size=32, head_epochs=2000, fine_tune_epochs=2000, patience=5000, batch_size=16,
                             workers=2, time_budget_min=0.25))
    metrics = json.loads((result.version_dir / "report" / "metrics.json").read_text())
    run_info = metrics["run"]
    plan = run_info["plan"]
    floor_train = budget.MIN_TRAIN_PER_CLASS * 10
    assert (plan["copies"], plan["train_images"], plan["validation_images"]) == (0, floor_train, 300)
    assert plan["test_images"] == SMALL.test == result.metrics["test_images"]  # under its floor: all of them
    assert (plan["variant_images"], plan["calibration_images"]) == (budget.MIN_VARIANT_IMAGES, 100)
    # done as planned: the sampled splits, their features, the variants' sample
    images = run_info["images"]
    assert abs(images["train"] - floor_train) <= 10 and images["validation"] == 300
    assert run_info["cache"]["rows"] == images["train"] + images["validation"]
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["variants"] and {v["evaluation"]["test_images"] for v in meta["variants"]} == {200}
    assert meta["training"]["augment_copies"] == 0 and meta["training"]["plan"] == plan
    # the epochs: the budget ended the head long before its 2000, and left nothing for the fine-tune
    assert 0 < run_info["epochs"]["head"] < 2000 and "fine_tune" in run_info["stopped_by_budget"]
    md = (result.version_dir / "report" / "report.md").read_text()
    assert "Planned up front to fit the budget: augmented copies 1 -> 0" in md and "training images" in md
    assert "(budget 0.25;" in md


def test_time_already_spent_comes_out_of_the_plan() -> None:
    """The plan counts from when the run began: what start-up took (importing TensorFlow, finding the data,
    building the model) is no longer there for the features."""
    c = cfg()
    fresh = plan_run(SMALL, VGG16_BF16_S, c, cached=True, previous=True)
    late = plan_run(SMALL, VGG16_BF16_S, c, cached=True, previous=True, spent_s=c.time_budget_min * 60 - 60)
    assert fresh.notes == [] and late.notes  # the README run fits when started now, not with a minute left
    assert late.train_images < fresh.train_images and late.copies <= fresh.copies


@pytest.mark.slow
def test_a_run_counts_its_budget_from_when_it_began(tmp_path: Path, clothing: Path) -> None:
    """`run(started=...)` (the command line passes its own start, before TensorFlow is imported): a run whose
    minute was spent before it got here stops its epochs by the budget; the same run started now does not."""
    import time

    from train.pipeline import run

    def one(name: str, started: float | None) -> dict[str, object]:
        result = run(TrainConfig(data=clothing, store=tmp_path, name=name, backbone="cnn", weights="none",
                                 image_size=32, max_per_class=3, head_epochs=40, patience=40, fine_tune_epochs=0,
                                 batch_size=8, workers=2, variants=False, time_budget_min=1), started=started)
        info: dict[str, object] = json.loads((result.version_dir / "report" / "metrics.json").read_text())["run"]
        return info

    now, late = one("now", None), one("late", time.perf_counter() - 120)
    # the plain CNN trains from scratch in one phase, "train"
    assert now["stopped_by_budget"] == [] and now["epochs"] == {"train": 40}
    assert late["stopped_by_budget"] == ["train"] and 0 < late["epochs"]["train"] < 40  # type: ignore[index]
