"""ImgEdit-Bench basic-suite reader on a synthetic extracted Benchmark.tar (singleturn.json + JPEG sources)."""

import json
import shutil

import pytest
from minidata import IMGEDIT_TYPES, SIZE, imgedit_entries, write_imgedit

from specedit.evals.imgedit import read_imgedit


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return write_imgedit(tmp_path_factory.mktemp("imgedit"), n_per_type=2)


def test_reads_every_entry_in_json_order_with_the_flat_layout(mini):
    data = read_imgedit(mini)
    entries = imgedit_entries(2)
    assert data.name == "imgedit" and data.source == str(mini) and len(data.items) == 18
    assert [it.key for it in data.items] == list(entries)
    assert data.categories() == list(IMGEDIT_TYPES)
    item = data.items[3]
    assert item.instruction == "adjust edit 1" and item.category == "adjust" and item.language == "en"
    assert item.meta == {"official_key": "103", "image_id": entries["103"]["id"], "edit_type": "adjust"}
    assert data.layout(item) == "103.png"
    assert data.output_path("out", "m", item).as_posix() == "out/m/103.png"


def test_images_decode_lazily_as_rgb(mini):
    img = read_imgedit(mini).items[5].load()
    assert img.mode == "RGB" and img.size == SIZE


def test_the_extracted_root_a_json_with_an_image_folder_and_a_type_filter(tmp_path, mini):
    root = mini.parent.parent
    assert [it.key for it in read_imgedit(root).items] == [it.key for it in read_imgedit(mini).items]
    basic = tmp_path / "basic_edit.json"  # the GitHub copy, apart from the images
    shutil.copy(mini / "singleturn.json", basic)
    data = read_imgedit(basic, images=mini)
    assert len(data.items) == 18 and data.items[0].load().size == SIZE
    picked = read_imgedit(mini, edit_types=["style", "action"])
    assert [it.category for it in picked.items] == ["style", "style", "action", "action"]


def test_the_first_published_alter_is_adjust(tmp_path, mini):
    entries = imgedit_entries(2)
    entries["102"]["edit_type"] = "alter"
    path = tmp_path / "basic_edit.json"
    path.write_text(json.dumps(entries))
    item = read_imgedit(path, images=mini).items[2]
    assert item.category == "adjust" and item.meta["edit_type"] == "alter"


def test_hub_id_with_the_extracted_folder(monkeypatch, mini):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(kw) or str(mini.parent)
    )
    data = read_imgedit("someone/ImgEdit-unpacked")
    assert calls == [
        {"repo_type": "dataset", "revision": None, "allow_patterns": ["*singleturn/*", "*basic_edit.json"]}
    ]
    assert data.source == "someone/ImgEdit-unpacked" and len(data.items) == 18


def test_hub_id_with_only_the_tar(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="holds no extracted ImgEdit benchmark: download Benchmark.tar"
    ):
        read_imgedit("sysuyy/ImgEdit")


def test_missing_json_and_folder_without_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImgEdit JSON .*basic_edit.json does not exist"):
        read_imgedit(tmp_path / "basic_edit.json")
    with pytest.raises(FileNotFoundError, match="no singleturn.json or basic_edit.json in .*Benchmark.tar"):
        read_imgedit(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub dataset id"):
        read_imgedit(tmp_path / "nothing")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e: e["101"].pop("prompt"), r"ImgEdit entry '101' in .* lacks prompt"),
        (lambda e: e["101"].update(id="", edit_type=None), r"ImgEdit entry '101' in .* lacks id, edit_type"),
        (lambda e: e["101"].update(edit_type="recolor"), r"entry '101' in .*: unknown edit_type 'recolor'"),
        (lambda e: e.update({"9": "a string"}), r"entry '9' in .* is a str, not an object"),
        (lambda e: e.update({"a/b": dict(e["101"])}), r"entry 'a/b' in .*: the key cannot name a file"),
    ],
)
def test_bad_entries_name_the_key(tmp_path, mini, edit, match):
    entries = imgedit_entries(2)
    edit(entries)
    path = tmp_path / "basic_edit.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=match):
        read_imgedit(path, images=mini)


def test_not_json_or_not_an_object(tmp_path, mini):
    path = tmp_path / "basic_edit.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="basic_edit.json is not valid JSON"):
        read_imgedit(path, images=mini)
    path.write_text("[]")
    with pytest.raises(ValueError, match="expected an object mapping keys to edits, got a list"):
        read_imgedit(path, images=mini)


def test_missing_images_are_counted_and_listed(tmp_path):
    root = write_imgedit(tmp_path, n_per_type=2)
    shutil.rmtree(root / "animal")
    with pytest.raises(
        FileNotFoundError, match=r"6 of 18 ImgEdit source images missing under .*animal/000000000.jpg"
    ):
        read_imgedit(root)
    with pytest.raises(FileNotFoundError, match="ImgEdit image folder .*nowhere does not exist"):
        read_imgedit(root, images=tmp_path / "nowhere")


def test_unknown_edit_type_filter(mini):
    with pytest.raises(ValueError, match="unknown ImgEdit edit type 'alter'"):
        read_imgedit(mini, edit_types=["alter"])


def test_undecodable_image_names_the_item(tmp_path):
    root = write_imgedit(tmp_path, n_per_type=1, edit_types=("add",))
    (root / "animal" / "000000000.jpg").write_bytes(b"not a jpeg")
    data = read_imgedit(root)
    with pytest.raises(ValueError, match=r"ImgEdit item '100': .*000000000.jpg does not decode as an image"):
        data.items[0].load()
