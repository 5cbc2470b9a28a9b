import pytest

from service.perception.calibration import HELD_OUT_PHOTOS, draw_sign, load_photo
from service.perception.models import model_path
from service.perception.text import TextReader, parse_parking_sign


@pytest.fixture(scope="module")
def sign():
    img, box = draw_sign(load_photo("person.jpg"), "P2 LEVEL C-14", (40, 20), 1.6)
    return img, box


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_reads_the_parking_sign_exactly(models_dir, sign, variant):
    reader = TextReader(model_path("ocr_det", variant, models_dir), model_path("ocr_rec", variant, models_dir),
                        dictionary_path=model_path("ocr_rec", "float", models_dir))
    img, (x1, y1, x2, y2) = sign
    lines = reader.read(img)
    assert [l.text for l in lines] == ["P2 LEVEL C-14"]
    bx = lines[0].box
    assert abs(bx[0] - x1) < 15 and abs(bx[2] - x2) < 15
    assert parse_parking_sign(lines) == {"level": "P2", "row": "C", "bay": "14"}


def test_a_photo_without_signs_reads_nothing_long(models_dir):
    reader = TextReader(model_path("ocr_det", "float", models_dir), model_path("ocr_rec", "float", models_dir))
    assert all(len(l.text) <= 3 for l in reader.read(load_photo(HELD_OUT_PHOTOS[1])))


@pytest.mark.parametrize("texts, expected", [
    (["P2 LEVEL C-14"], {"level": "P2", "row": "C", "bay": "14"}),
    (["LEVEL 3", "ROW B", "BAY 118"], {"level": "3", "row": "B", "bay": "118"}),
    (["b1", "d-7"], {"level": "B1", "row": "D", "bay": "7"}),
    (["EXIT 12 BERLIN"], {}),
    (["Deck: 4  Zone E  Space 21"], {"level": "4", "row": "E", "bay": "21"}),
])
def test_parse_parking_sign(texts, expected):
    assert parse_parking_sign(texts) == expected
