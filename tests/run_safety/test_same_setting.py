"""The one "same run" rule (checkpoints.same_setting) that adapter checkpoints and the CLI's resume check share."""

from qblora_pl.checkpoints import SAME_SETTING_REL_TOL, same_setting
from qblora_pl.paths import EMBEDDED_MODEL_DIR


def test_numbers_are_the_same_setting_within_the_one_tolerance():
    assert same_setting(3e-3, 3e-3 * (1 + SAME_SETTING_REL_TOL / 2))
    assert not same_setting(3e-3, 3e-3 * (1 + 10 * SAME_SETTING_REL_TOL))
    assert same_setting(8, 8.0) and not same_setting(8, 9)
    assert same_setting([1, 2.0], (1.0, 2)) and not same_setting([1, 2], [1, 2, 3])


def test_class_paths_compare_as_classes_and_ignore_only_changeable_args():
    short = {"class_path": "qblora_pl.adapters.QABLoRA", "init_args": {"budget_rank": 8, "dropout": 0.05}}
    full = {"class_path": "qblora_pl.adapters.qablora.QABLoRA", "init_args": {"budget_rank": 8.0, "dropout": 0.1}}
    assert same_setting(short, full)  # one class, two import paths; dropout may change on resume
    assert not same_setting(short, {**full, "init_args": {"budget_rank": 16}})
    assert not same_setting(short, {"class_path": "qblora_pl.adapters.QALoRA", "init_args": {}})


def test_two_spellings_of_one_model_location_are_the_same():
    assert same_setting("embedded:tiny-llama", str(EMBEDDED_MODEL_DIR))
    assert not same_setting("embedded:tiny-llama", "/no/such/model")
