"""Small parts of the service on their own: settings, API keys, media types, content negotiation,
result shaping and the command line's start-up checks."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from gridfeats.features import BottomUpSettings, FeatureSpec
from gridfeats.store.records import grid_record, region_record
from service import cli
from service.auth import ApiKeyChecker, ApiKeyFileError, read_key_file
from service.encoding import choose_media_type, encode_npy, npz_arrays
from service.errors import InvalidParameter, ModelFailure, NotAcceptable, UnsupportedMediaType
from service.results import (
    ImageResult,
    Vocabulary,
    VocabularyError,
    cast_features,
    feature_spec,
    shape_results,
)
from service.schemas import FeatureQuery
from service.settings import ServiceSettings, SettingsError, load_settings
from service.uploads import base_media_type, check_media_type, sniff_image_type
from tests.service.helpers import image_bytes


# ---------------------------------------------------------------------------------- settings
def test_settings_come_from_env_and_flags_win(monkeypatch):
    env = {
        "GRIDFEATS_MAX_BATCH": "16",
        "GRIDFEATS_PORT": "9000",
        "GRIDFEATS_API_KEYS": "a, b,,c",
        "GRIDFEATS_OPTS": "INPUT.MIN_SIZE_TEST 96 MODEL.DEVICE 'cpu'",
        "GRIDFEATS_WARMUP": "false",
        "UNRELATED": "x",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings({"port": 8123, "host": None})
    assert settings.max_batch == 16 and settings.port == 8123 and settings.host == "127.0.0.1"
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b", "c"]
    assert settings.opts == ("INPUT.MIN_SIZE_TEST", "96", "MODEL.DEVICE", "cpu")
    assert settings.warmup is False
    assert "a" not in repr(settings.api_keys)  # secrets stay hidden in reprs and logs


@pytest.mark.parametrize(
    "env,phrase",
    [
        ({"GRIDFEATS_MAX_BATCH": "0"}, "max_batch (flag or GRIDFEATS_MAX_BATCH)"),
        ({"GRIDFEATS_PORT": "http"}, "port (flag or GRIDFEATS_PORT)"),
        ({"GRIDFEATS_PRECISION": "int8"}, "precision"),
    ],
)
def test_invalid_settings_name_the_setting(env, phrase, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings({})
    assert phrase in str(err.value)


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_map_onto_settings():
    args = _parse(
        [
            "--max-batch",
            "4",
            "--max-wait-ms",
            "2.5",
            "--cors-origins",
            "https://a.example, https://b.example",
            "--no-warmup",
            "--batched-forward",
            "INPUT.MIN_SIZE_TEST",
            "96",
        ]
    )
    settings = load_settings(cli._overrides(args))
    assert (settings.max_batch, settings.max_wait_ms, settings.warmup) == (4, 2.5, False)
    assert settings.batched_forward is True and settings.exact_kernels is False
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.opts == ("INPUT.MIN_SIZE_TEST", "96")


@pytest.mark.parametrize(
    "overrides,phrase",
    [
        (dict(config="no-such-config.yaml"), "config:"),
        (dict(opts=("INPUT.NOT_A_KEY", "1")), "config:"),
        (dict(opts=("INPUT.MIN_SIZE_TEST",)), "KEY VALUE pairs"),
        (dict(weights="/nonexistent/model.pth"), "weights: file not found"),
        (dict(objects_vocab="/nonexistent/objects.txt"), "objects_vocab: file not found"),
        (dict(device="tpu:0"), "device:"),
    ],
)
def test_start_up_checks_fail_fast_with_one_line(overrides, phrase):
    with pytest.raises(SettingsError) as err:
        cli.check_model_settings(ServiceSettings(**overrides))
    assert phrase in str(err.value)


def test_every_setting_is_a_flag_with_the_models_choices_and_defaults():
    from gridfeats.data.image_io import DEFAULT_MAX_PIXELS
    from gridfeats.precision import PRECISIONS
    from service.settings import ENV_ONLY

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(ServiceSettings.model_fields) - set(ENV_ONLY)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert "--api-keys" not in flags and "--api-keys-file" in flags  # keys never on a command line
    assert actions["precision"].choices == PRECISIONS
    assert actions["warmup"].option_strings == ["--no-warmup"] and actions["warmup"].const is False
    assert all(a.default is None for name, a in actions.items() if name != "opts")
    # One pixel limit for the service and extraction: the image reader's.
    assert ServiceSettings().max_pixels == DEFAULT_MAX_PIXELS
    assert "89478485" in actions["max_pixels"].help


def test_cli_run_returns_2_and_prints_the_reason(capsys):
    code = cli.run(_parse(["--weights", "/nonexistent/model.pth"]))
    assert code == 2
    assert "gridfeats serve: error: weights: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- API keys
def test_api_key_checker():
    off = ApiKeyChecker([])
    assert not off.enabled and off.is_valid(None)
    on = ApiKeyChecker(["alpha", "beta"])
    assert on.enabled
    assert on.is_valid("alpha") and on.is_valid("beta")
    assert not on.is_valid("alph") and not on.is_valid("") and not on.is_valid(None)


def test_api_key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\n  k1  \nk2\n")
    assert read_key_file(str(path)) == ["k1", "k2"]
    assert ApiKeyChecker.from_sources(["k0"], str(path)).is_valid("k2")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ApiKeyFileError, match="holds no keys"):
        read_key_file(str(tmp_path / "empty"))
    with pytest.raises(ApiKeyFileError, match="not found"):
        read_key_file(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------- media types
@pytest.mark.parametrize(
    "fmt,media",
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
        ("WEBP", "image/webp"),
    ],
)
def test_sniffing_recognises_each_accepted_format(fmt, media):
    assert sniff_image_type(image_bytes(8, 8, fmt=fmt)) == media


def test_media_type_checks():
    png = image_bytes(8, 8)
    assert base_media_type("Image/JPG; charset=binary") == "image/jpeg"
    check_media_type("image/png", png, "x")
    check_media_type("application/octet-stream", png, "x")  # multipart parts: the bytes decide
    check_media_type("image/png", b"unknown bytes", "x")  # left to the decoder's 400
    with pytest.raises(UnsupportedMediaType, match="which is image/png"):
        check_media_type("image/webp", png, "x")
    with pytest.raises(UnsupportedMediaType, match="unsupported content type 'application/pdf'"):
        check_media_type("application/pdf", png, "x")


# ------------------------------------------------------------------------------- negotiation
@pytest.mark.parametrize(
    "accept,chosen",
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/x-npy", "application/x-npy"),
        ("text/html, application/x-npz;q=0.5, application/json;q=0.4", "application/x-npz"),
        ("application/json;q=0.1, application/x-npy", "application/x-npy"),
        ("text/html, */*;q=0.1", "application/json"),
    ],
)
def test_accept_header_negotiation(accept, chosen):
    assert choose_media_type(accept) == chosen


def test_unsatisfiable_accept_headers_are_406():
    for accept in ("text/html", "application/x-npy;q=0"):
        with pytest.raises(NotAcceptable):
            choose_media_type(accept)
    two = [
        ImageResult(i, (1, 1), (1, 1), {"features": np.zeros((1, 2), np.float32)}) for i in range(2)
    ]
    with pytest.raises(NotAcceptable):
        encode_npy(two)
    assert sorted(npz_arrays(two)) == [
        "0/features",
        "0/image_hw",
        "0/input_hw",
        "1/features",
        "1/image_hw",
        "1/input_hw",
    ]


# ----------------------------------------------------------------------------------- shaping
def test_feature_specs_follow_the_query():
    assert feature_spec(FeatureQuery()) == FeatureSpec("grid")
    assert feature_spec(FeatureQuery(grid_pool="7x5")) == FeatureSpec("grid", grid_pool=(7, 5))
    assert feature_spec(FeatureQuery(mode="region", attr_topk=3)) == FeatureSpec(
        "region", attr_topk=3
    )
    bottom_up = feature_spec(
        FeatureQuery(mode="region", regions="bottom-up", min_boxes=36, max_boxes=36)
    )
    assert bottom_up.regions == BottomUpSettings(score_thresh=0.2, min_boxes=36, max_boxes=36)
    # Equal options give equal (hashable) specs: the backend groups a batch by them.
    assert (
        len({feature_spec(FeatureQuery(mode="region")), feature_spec(FeatureQuery(mode="region"))})
        == 1
    )


@pytest.mark.parametrize(
    "params,phrase",
    [
        (dict(grid_pool="0x3"), "grid_pool sides must be 1..64"),
        (dict(grid_pool="65x1"), "grid_pool sides must be 1..64"),
        (dict(mode="region", grid_pool="2x2"), "grid mode only"),
        (dict(mode="region", regions="bottom-up", min_boxes=5, max_boxes=4), "exceeds max_boxes"),
        (dict(attr_topk=3), "attr_topk applies to mode=region only"),
        (
            dict(mode="region", bottom_up_thresh=0.5, min_boxes=2),
            "bottom_up_thresh, min_boxes apply to regions=bottom-up",
        ),
    ],
)
def test_inconsistent_queries_are_refused(params, phrase):
    with pytest.raises(ValueError, match=phrase):
        FeatureQuery(**params)


def test_feature_casts_refuse_overflow_and_non_finite_values():
    assert cast_features(np.ones((2, 2), np.float32), "float16", 0).dtype == np.float16
    with pytest.raises(InvalidParameter, match="exceed the float16 range"):
        cast_features(np.full((1, 2), 1e6, np.float32), "float16", 3)
    with pytest.raises(ModelFailure, match="image 1"):
        cast_features(np.array([[np.nan]], np.float32), "float32", 1)


def test_records_become_answers_with_vocabulary_names():
    region = region_record(
        features=np.ones((2, 3), np.float32),
        boxes=np.zeros((2, 4), np.float32),
        scores=np.array([0.9, 0.2], np.float32),
        classes=np.array([2, 0], np.int32),
        attr_ids=np.array([[1], [0]], np.int32),
        attr_scores=np.array([[0.9], [0.6]], np.float32),
        image_hw=(5, 6),
        input_hw=(10, 12),
    )
    vocab = Vocabulary(objects=("cat", "dog", "tree"), attributes=("red", "tall"))
    (result,) = shape_results([region], FeatureQuery(mode="region", precision="float16"), vocab)
    assert result.names == {"class_names": ["tree", "cat"], "attr_names": [["tall"], ["red"]]}
    assert (result.image_hw, result.input_hw) == ((5, 6), (10, 12))
    assert result.arrays["features"].dtype == np.float16 and "image_hw" not in result.arrays
    grid = grid_record(np.zeros((3, 2, 2), np.float32), (5, 6), (10, 12))
    (grid_result,) = shape_results([grid], FeatureQuery(), vocab)
    assert grid_result.arrays["features"].shape == (4, 3) and grid_result.names == {}
    assert grid_result.arrays["grid_hw"].tolist() == [2, 2]


def test_vocabulary_files_must_match_the_model(tmp_path):
    objects = tmp_path / "objects_vocab.txt"
    objects.write_text("cat\ndog,puppy\ntree")
    attributes = tmp_path / "attributes_vocab.txt"
    attributes.write_text("red\ntall")
    vocab = Vocabulary.load(str(objects), str(attributes), num_classes=3, num_attributes=2)
    assert vocab.objects == ("cat", "dog", "tree") and vocab.loaded
    with pytest.raises(VocabularyError, match="names 3 objects but the model has 1600 classes"):
        Vocabulary.load(str(objects), None, num_classes=1600, num_attributes=400)
