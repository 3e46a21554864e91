"""GEdit-Bench reader on synthetic data in the official columns (parquet shards and `datasets` Arrow files)."""

import sys

import pytest

pytest.importorskip("pyarrow")

from minidata import SIZE, colour, gedit_rows, write_gedit, write_rows  # noqa: E402

from specedit.evals.gedit import read_gedit, srcimg_layout  # noqa: E402


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return write_gedit(tmp_path_factory.mktemp("gedit"), n_per_lang=4)


def test_reads_every_row_with_unique_keys_and_the_scorer_layout(mini):
    data = read_gedit(mini)
    assert data.name == "gedit" and data.source == str(mini) and len(data.items) == 8
    assert [it.language for it in data.items] == ["en"] * 4 + ["cn"] * 4
    assert len({it.key for it in data.items}) == 8
    first = data.items[0]
    assert first.key == "en/000000a0" and first.meta["official_key"] == "000000a0"
    assert first.instruction == "edit 0 (en)" and first.category == "background_change"
    assert data.layout(first) == "fullset/background_change/en/000000a0.png"
    assert srcimg_layout(data.items[5]) == "fullset/subject-add/cn/000000a1_SRCIMG.png"
    assert data.output_path("out", "m", first).as_posix() == "out/m/fullset/background_change/en/000000a0.png"
    assert [it.meta["intersection"] for it in data.items[:4]] == [True, False, True, False]
    assert data.categories() == ["background_change", "subject-add", "text_change"]


def test_images_decode_lazily_raw_or_downsized(mini):
    raw, small = read_gedit(mini).items[3], read_gedit(mini, image="downsized").items[3]
    img = raw.load()
    assert img.mode == "RGB" and img.size == SIZE and img.getpixel((0, 0)) == colour(3)
    assert small.load().size == (SIZE[0] // 2, SIZE[1] // 2)
    assert raw.meta["load_srcimg"]().size == (SIZE[0] // 2, SIZE[1] // 2)


def test_languages_and_intersection_subset(mini):
    en = read_gedit(mini, languages=("en",))
    assert [it.key for it in en.items] == ["en/000000a0", "en/000000a1", "en/000000a2", "en/000000a3"]
    inter = read_gedit(mini, languages="cn", subset="intersection")
    assert [it.key for it in inter.items] == ["cn/000000a0", "cn/000000a2"]
    assert all(it.meta["intersection"] for it in inter.items)


def test_arrow_shards_and_a_single_file_read_like_parquet(tmp_path, mini):
    arrow = write_gedit(tmp_path / "arrow", n_per_lang=4, fmt="arrow", shards=3)
    (arrow / "train" / "cache-0123.arrow").write_bytes(b"not arrow")  # a `datasets` cache file is skipped
    a, p = read_gedit(arrow), read_gedit(mini)
    assert [(it.key, it.instruction, it.category) for it in a.items] == [
        (it.key, it.instruction, it.category) for it in p.items
    ]
    assert a.items[7].load().getpixel((0, 0)) == colour(3)
    one = read_gedit(arrow / "train" / "data-00000-of-00003.arrow")
    assert len(one.items) == 3


def test_hub_id_downloads_only_the_data_files(monkeypatch, mini):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(mini)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    data = read_gedit(revision="refs/convert/parquet")
    assert calls == [
        ("stepfun-ai/GEdit-Bench", {"repo_type": "dataset", "revision": "refs/convert/parquet",
                                    "allow_patterns": ["*.parquet", "*.arrow"]}),
    ]  # fmt: skip
    assert data.source == "stepfun-ai/GEdit-Bench@refs/convert/parquet" and len(data.items) == 8


@pytest.mark.parametrize(
    "error, kind, match",
    [
        ("LocalEntryNotFoundError", ConnectionError, "the hub is unreachable; pass a local folder instead"),
        ("RepositoryNotFoundError", FileNotFoundError, "hub dataset someone/GEdit not found"),
    ],
)
def test_hub_errors_say_what_to_do(monkeypatch, error, kind, match):
    import huggingface_hub

    def fake(repo_id, **kw):
        raise type(error, (Exception,), {})("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(kind, match=match):
        read_gedit("someone/GEdit")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"languages": ("en", "zh")}, "unknown GEdit language 'zh'"),
        ({"languages": ()}, "no GEdit language chosen"),
        ({"subset": "inter"}, "unknown GEdit subset 'inter'"),
        ({"image": "full"}, "unknown GEdit image 'full'"),
        ({"revision": "main"}, "applies to hub ids"),
    ],
)
def test_bad_options(mini, kw, match):
    with pytest.raises(ValueError, match=match):
        read_gedit(mini, **kw)


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"no GEdit-Bench parquet or arrow files under {tmp_path}"):
        read_gedit(tmp_path)
    with pytest.raises(ValueError, match="notes.txt is not a GEdit-Bench data file"):
        read_gedit(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub dataset id"):
        read_gedit(tmp_path / "missing")


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_missing_columns_are_named_with_the_file(tmp_path, fmt):
    keep = ["task_type", "key", "instruction", "instruction_language", "input_image"]
    path = write_rows(tmp_path / f"x.{fmt}", gedit_rows(2), fmt, columns=keep)
    with pytest.raises(
        ValueError, match=rf"{path} lacks the GEdit-Bench columns input_image_raw, Intersection_exist"
    ):
        read_gedit(tmp_path)


def test_undecodable_image_names_the_item(tmp_path):
    rows = gedit_rows(2)
    rows[1]["input_image_raw"] = {"bytes": b"garbage", "path": None}
    rows[2]["input_image_raw"] = {"bytes": None, "path": "elsewhere.png"}
    write_rows(tmp_path / "data" / "train.parquet", rows, "parquet")
    data = read_gedit(tmp_path)  # reading decodes nothing
    with pytest.raises(
        ValueError, match=r"GEdit item 'en/000000a1': column input_image_raw of .* does not decode"
    ):
        data.items[1].load()
    with pytest.raises(
        ValueError, match=r"GEdit item 'cn/000000a0': no image bytes in column input_image_raw"
    ):
        data.items[2].load()
    assert data.items[0].load().size == SIZE


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("instruction_language", "zh", "unknown instruction_language 'zh'"),
        ("key", "a/b", "key 'a/b' cannot name a file"),
        ("instruction", None, "instruction is None, not a non-empty string"),
    ],
)
def test_bad_rows_name_row_and_file(tmp_path, field, value, match):
    rows = gedit_rows(2)
    rows[1][field] = value
    path = write_rows(tmp_path / "x.parquet", rows, "parquet")
    with pytest.raises(ValueError, match=rf"GEdit row 1 of {path}: {match}"):
        read_gedit(tmp_path)


def test_a_key_twice_in_one_language(tmp_path):
    rows = gedit_rows(2, languages=("en",))
    rows[1]["key"] = rows[0]["key"]
    write_rows(tmp_path / "x.parquet", rows, "parquet")
    with pytest.raises(ValueError, match=r"GEdit key '000000a0' \(en\) appears twice in"):
        read_gedit(tmp_path)


def test_not_a_data_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match="x.parquet is not a readable parquet file"):
        read_gedit(tmp_path)
    with pytest.raises(ValueError, match="y.arrow is not an Arrow IPC file"):
        (tmp_path / "y.arrow").write_bytes(b"nope")
        read_gedit(tmp_path / "y.arrow")


def test_missing_pyarrow_says_what_to_install(monkeypatch, mini):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'specedit\[bench\]'"):
        read_gedit(mini)
