"""Loading the shipped data and users' CSV files; every bad file gets a message that says why."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from model_export import data


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "d.csv"
    path.write_text(text)
    return path


def test_default_data_is_the_569_by_30_wisconsin_set_with_its_checksum() -> None:
    ds = data.load_default()
    assert ds.x.shape == (569, 30)
    assert ds.class_names == ("benign", "malignant")
    assert np.bincount(ds.y).tolist() == [357, 212]
    assert ds.feature_names[0] == "radius_mean"
    assert ds.sha256 == hashlib.sha256(data.default_data_bytes()).hexdigest()
    source_note = (Path(data.__file__).parent / "data" / "SOURCE.md").read_text()
    assert ds.sha256 in source_note


def test_user_csv_with_selected_features_and_numeric_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,c,label\n1,2,3,10\n4,5,6,2\n7,8,9,10\n")
    ds = data.load_csv(path, "label", ["c", "a"])
    assert ds.feature_names == ("c", "a")
    assert ds.class_names == ("2", "10")  # numeric labels sort as numbers
    np.testing.assert_array_equal(ds.x, [[3, 1], [6, 4], [9, 7]])
    np.testing.assert_array_equal(ds.y, [1, 0, 1])


@pytest.mark.parametrize(
    ("text", "target", "features", "message"),
    [
        ("a,y\n1,p\n2,q\n", "label", None, "target column 'label' not found"),
        ("a,y\n1,p\n2,q\n", "y", ["a", "zz"], "feature columns not found: ['zz']"),
        ("a,y\n1,p\nhello,q\n", "y", None, "line 3, column 'a': 'hello' is not a number"),
        ("a,y\n1,p\n,q\n", "y", None, "line 3, column 'a': '' is not a number"),
        ("a,y\n1,p\nnan,q\n", "y", None, "line 3, column 'a': 'nan' is missing or not finite"),
        ("a,y\n1,p\n2,p\n", "y", None, "has 1 class(es); at least 2 are needed"),
        ("a,y\n1,p\n2\n", "y", None, "line 3 has 1 fields, the header has 2"),
        ("a,y\n", "y", None, "no data rows"),
        ("", "y", None, "the file is empty"),
        ("a,a,y\n1,2,p\n", "y", None, "duplicate column names"),
    ],
)
def test_bad_csv_is_refused_with_a_clear_message(
    tmp_path: Path, text: str, target: str, features: list[str] | None, message: str
) -> None:
    with pytest.raises(
        data.DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        data.load_csv(_csv(tmp_path, text), target, features)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"data file not found: .*nope\.csv"):
        data.load_csv(tmp_path / "nope.csv", "y")


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    y = np.array([0] * 80 + [1] * 20)
    tr, va = data.stratified_split(y, 0.25, np.random.default_rng(0))
    assert sorted([*tr, *va]) == list(range(100))
    assert np.bincount(y[va]).tolist() == [20, 5]
    _, va2 = data.stratified_split(y, 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(va, va2)


def test_a_class_with_one_example_cannot_be_split() -> None:
    with pytest.raises(data.DataError, match="has 1 example"):
        data.stratified_split(np.array([0, 0, 0, 1]), 0.25, np.random.default_rng(0))


def test_constant_feature_standardises_to_zero_not_nan() -> None:
    mean, std = data.standardisation(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_array_equal(std, [1.0, 1.0])
    np.testing.assert_array_equal(mean, [2.0, 5.0])


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_the_separator_is_detected(tmp_path: Path, sep: str) -> None:
    text = "".join(sep.join(r) + "\n" for r in
                   [["width", "height", "label"], ["1.5", "2", "x"], ["3", "4.25", "y"]])
    ds = data.load_csv(_csv(tmp_path, text), "label")
    assert (ds.delimiter, ds.feature_names) == (sep, ("width", "height"))
    np.testing.assert_array_equal(ds.x, [[1.5, 2], [3, 4.25]])


def test_a_comma_file_with_semicolons_inside_quotes_stays_comma_separated(tmp_path: Path) -> None:
    ds = data.load_csv(_csv(tmp_path, 'a,note,y\n1,"p;q",u\n2,"r;s",v\n'), "y", ["a"])
    assert ds.delimiter == ","
    assert ds.x[:, 0].tolist() == [1, 2]


def test_a_decimal_comma_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(data.DataError,
                       match=r"'1,5' is not a number \(a decimal comma\? .*: 1\.5\)"):
        data.load_csv(_csv(tmp_path, "a;b;y\n1,5;2;p\n3;4;q\n"), "y")


def test_a_header_read_as_one_column_says_which_separators_are_read(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"columns are \['a:b:y'\] \(the header was read as "
                       r"one column: bnserve reads files separated by ',', ';', tab or '\|'"):
        data.load_csv(_csv(tmp_path, "a:b:y\n1:2:p\n"), "y")


def test_an_id_column_gets_a_hint_to_choose_the_features(tmp_path: Path) -> None:
    path = _csv(tmp_path, "id,a,name,b,y\nr1,1,ann,2,p\nr2,3,bob,4,q\n")
    with pytest.raises(data.DataError) as e:
        data.load_csv(path, "y")
    assert str(e.value).endswith(
        "line 2, column 'id': 'r1' is not a number: columns 'id', 'name' hold text (ids or "
        "names?); every column but the target is a feature unless --features names the feature "
        "columns, e.g. --features a,b")
    with pytest.raises(data.DataError) as e:
        data.load_csv(path, "y", ["a", "id", "b"])
    assert str(e.value).endswith("column 'id' holds text (an id or a name?); leave it out of "
                                 "--features, e.g. --features a,b")
    assert data.load_csv(path, "y", ["a", "b"]).x.tolist() == [[1, 2], [3, 4]]
