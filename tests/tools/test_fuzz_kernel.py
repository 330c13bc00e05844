"""tools/fuzz_kernel.py: the crop-decode kernel under ASan and UBSan over mutated JPEGs, and proof that a
sanitizer report fails the run."""

import io

import numpy as np
import pytest
from PIL import Image

from dailymae_jax.data.jpeg_crop import LIBJPEG_HUFFMAN, NO_DCT_SCALING, check_result, decode_crop, decode_into
from tools import fuzz_kernel

SHORT_RUN = 5_000  # mutated JPEGs in `make test`; `make fuzz` runs 100,000


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    """(driver, corpus, scratch directory): the kernel built under the sanitizers, the base files."""
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "corpus").mkdir()
    return fuzz_kernel.build_driver(directory), fuzz_kernel.make_corpus(directory / "corpus"), directory


@pytest.mark.slow  # a sanitizer build (~5 s) and 5,000 cases (~10 s)
def test_mutated_jpegs_raise_no_sanitizer_report(sanitized):
    driver, corpus, directory = sanitized
    assert fuzz_kernel.run(driver, corpus, count=SHORT_RUN, seed=0, jobs=1, workdir=directory) == SHORT_RUN


@pytest.mark.slow  # shares the sanitizer build
@pytest.mark.parametrize("bug, report", [("overread", "heap-buffer-overflow"),
                                         ("overflow", "signed integer overflow")])
def test_a_sanitizer_report_fails_the_run(sanitized, bug, report):
    driver, corpus, directory = sanitized
    with pytest.raises(fuzz_kernel.FuzzError, match=report):
        fuzz_kernel.run(driver, corpus, count=10, seed=0, jobs=1, workdir=directory, plant=bug)


def test_the_corpus_covers_every_decode_path(tmp_path):
    corpus = fuzz_kernel.make_corpus(tmp_path)
    names = {path.stem for path in corpus}
    data = {path.stem: path.read_bytes() for path in corpus}
    restart_intervals = {data[n][data[n].index(b"\xff\xdd") + 4:][:2] for n in names if "rst" in n}
    assert {b"\x00\x01", b"\x00\x0a"} <= restart_intervals  # every MCU, every row (of 160 px): splicing
    assert any(b"DMJXIDX1" in data[n] for n in names if "index" in n)  # the writer's crop index
    assert any(b"\xff\xc2" in data[n] for n in names if "progressive" in n)  # libjpeg's own decoder
    assert {"8x8_gray", "500x375_s1", "dc_overflow", "sos_at_end"} <= names


def test_a_scan_header_cut_at_its_length_is_a_one_line_error():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    data = fuzz_kernel.sos_at_end_jpeg(fuzz_kernel.jpeg_bytes(rgb, restart_rows=1))
    with pytest.raises(ValueError, match="cannot decode JPEG: Premature end of JPEG file$"):
        decode_crop(data, (0, 16, 16, 16), (8, 8))  # a crop the kernel would splice from the restart intervals


@pytest.mark.parametrize("top, left", [(2**31 - 2, 0), (0, 2**31 - 2)])
def test_a_box_near_int32_max_is_refused_by_the_c_entry_point(top, left):
    # The loaders call the kernel with boxes they computed; the restart splicing used to add top + height in int.
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    data = np.frombuffer(fuzz_kernel.jpeg_bytes(rgb, restart_rows=1), np.uint8)
    out = np.empty((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="is outside the 32x48 image"):
        check_result(decode_into(data, top, left, 16, 16, out, 0))


def test_dc_predictors_summed_past_int32_decode_as_libjpeg_does():
    data = fuzz_kernel.dc_overflow_jpeg()
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    # The last rows, past 65,536 blocks of +32767 each: our Huffman decoder keeps the low 16 bits, as libjpeg does.
    box = (2000, 1000, 56, 100)
    np.testing.assert_array_equal(decode_crop(data, box, (56, 100), flags=NO_DCT_SCALING),
                                  reference[2000:2056, 1000:1100])
    whole = (0, 0, 2056, 2048)
    np.testing.assert_array_equal(decode_crop(data, whole, (64, 64)),
                                  decode_crop(data, whole, (64, 64), flags=LIBJPEG_HUFFMAN))


def test_bad_arguments_and_a_missing_compiler_exit_2(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        fuzz_kernel.main(["--count", "0"])
    assert exit_info.value.code == 2 and "--count" in capsys.readouterr().err
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(SystemExit) as exit_info:
        fuzz_kernel.build_driver(tmp_path)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: cannot run the C compiler") and error.count("\n") == 1
