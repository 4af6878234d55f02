"""Trigger specs: parsing, presets, determinism and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from agme_hub.errors import ShapeMismatchError, TriggerSpecError
from agme_hub.surrogate_triggers import DeltaTrigger
from agme_hub.triggers import PRESETS, AdditiveTrigger, BlendTrigger, LSBTrigger, PatchTrigger, SIGTrigger, parse_trigger

from .helpers import write_png


@pytest.fixture
def grey():
    return np.random.default_rng(1).integers(0, 200, (4, 28, 28, 1), dtype=np.uint8)


def test_patch_positions_and_fills(grey):
    stamped = parse_trigger("patch:size=3,pos=bottom-right,fill=white").apply(grey)
    assert (stamped[:, -3:, -3:] == 255).all()
    assert np.array_equal(stamped[:, :-3], grey[:, :-3])
    xy = parse_trigger("patch:size=2,pos=5,7,fill=black").apply(grey)
    assert (xy[:, 7:9, 5:7] == 0).all() and np.array_equal(xy[:, :7], grey[:, :7])
    checker = parse_trigger("patch:size=4,pos=top-left,fill=checker").apply(grey)
    assert checker[0, 0, 0, 0] == 255 and checker[0, 0, 1, 0] == 0
    bar = parse_trigger("patch:size=1x5,pos=bottom-left").apply(grey)
    assert (bar[:, -5:, 0] == 255).all() and np.array_equal(bar[:, :, 1:], grey[:, :, 1:])


def test_six_badnets_presets_differ():
    assert len(PRESETS) == 6
    rgb = np.full((1, 28, 28, 3), 100, np.uint8)
    stamped = [parse_trigger(name).apply(rgb) for name in PRESETS]
    assert all((s != rgb).any() for s in stamped)
    assert len({s.tobytes() for s in stamped}) == 6


def test_colour_patch_on_rgb():
    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    out = parse_trigger("badnets-red-tr").apply(rgb)
    assert out[0, 0, -1].tolist() == [255, 0, 0]


def test_blend_is_deterministic_for_a_seed(grey):
    a = parse_trigger("blend:alpha=0.15,image=noise,seed=0").apply(grey)
    b = parse_trigger("blend:alpha=0.15,seed=0").apply(grey)
    c = parse_trigger("blend:alpha=0.15,seed=1").apply(grey)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    delta = np.abs(a.astype(int) - grey.astype(int))
    assert delta.max() <= np.ceil(0.15 * 255) + 1


def test_image_trigger_with_mask(tmp_path, grey):
    pattern = write_png(tmp_path / "p.png", np.full((28, 28), 200, np.uint8))
    mask = np.zeros((28, 28), np.uint8)
    mask[:4, :4] = 255
    mask[4:8, 4:8] = 128
    mask_path = write_png(tmp_path / "m.png", mask)
    trig = parse_trigger(f"image:pattern={pattern},mask={mask_path}")
    out = trig.apply(grey)
    assert (out[:, :4, :4] == 200).all()
    assert np.allclose(out[:, 4:8, 4:8], np.rint(0.498 * grey[:, 4:8, 4:8] + 0.502 * 200), atol=1)
    assert np.array_equal(out[:, 10:], grey[:, 10:])


def test_mismatched_pattern_size_needs_resize(tmp_path, grey):
    pattern = write_png(tmp_path / "p.png", np.full((32, 32), 200, np.uint8))
    mask = write_png(tmp_path / "m.png", np.full((32, 32), 255, np.uint8))
    with pytest.raises(ShapeMismatchError, match="resize=true"):
        parse_trigger(f"image:pattern={pattern},mask={mask}").apply(grey)
    out = parse_trigger(f"image:pattern={pattern},mask={mask},resize=true").apply(grey)
    assert (out == 200).all()


def test_additive_is_bounded(tmp_path, grey):
    out = parse_trigger("additive:delta=noise,eps=16/255").apply(grey)
    assert np.abs(out.astype(int) - grey.astype(int)).max() <= 16
    delta = np.random.default_rng(0).uniform(-0.5, 0.5, (28, 28, 1)).astype(np.float32)
    np.save(tmp_path / "d.npy", delta)
    out = parse_trigger(f"additive:delta={tmp_path / 'd.npy'},eps=8/255").apply(grey)
    assert 0 < np.abs(out.astype(int) - grey.astype(int)).max() <= 8


def test_sig_is_a_bounded_sinusoid_along_the_columns():
    flat = np.full((2, 28, 28, 3), 128, np.uint8)
    out = parse_trigger("sig:delta=20,freq=6").apply(flat).astype(int) - 128
    assert isinstance(parse_trigger("sig:delta=20,freq=6"), SIGTrigger)
    assert 18 <= np.abs(out).max() <= 20  # the amplitude, in pixel units (28 columns miss the exact peak)
    assert (out == out[:, :1]).all() and (out == out[..., :1]).all()  # the same on every row and channel
    expected = np.rint(20 * np.sin(2 * np.pi * np.arange(28) * 6 / 28)).astype(int)
    assert np.abs(out[0, 0, :, 0] - expected).max() <= 1
    sign_changes = int((np.diff(np.sign(expected[expected != 0])) != 0).sum())
    assert 2 * 6 - 2 <= sign_changes <= 2 * 6  # six periods across the width
    bright = parse_trigger("sig:delta=20,freq=6").apply(np.full((1, 28, 28, 1), 250, np.uint8))
    assert bright.max() == 255  # clipped, not wrapped


def test_delta_surrogate_saves_as_an_additive_spec(tmp_path, grey):
    delta = np.random.default_rng(2).uniform(-10, 10, (28, 28, 1)).astype(np.float32)
    surrogate = DeltaTrigger(delta_array=delta)
    spec = surrogate.save(tmp_path / "s")
    assert np.abs(parse_trigger(spec).apply(grey).astype(int) - surrogate.apply(grey).astype(int)).max() <= 1


def test_lsb_changes_only_low_bits(grey):
    out = parse_trigger("lsb:seed=0,bits=2").apply(grey)
    assert np.array_equal(out >> 2, grey >> 2) and not np.array_equal(out, grey)


def test_spec_round_trips_and_file_forms(tmp_path, grey):
    for trig in (PatchTrigger(size="2", pos="center", fill="noise", seed=3), BlendTrigger(alpha=0.2, seed=2),
                 AdditiveTrigger(eps="8/255"), SIGTrigger(delta=12.5, freq=3), LSBTrigger(bits=1, seed=4)):
        assert np.array_equal(parse_trigger(trig.spec).apply(grey), trig.apply(grey))
    (tmp_path / "t.json").write_text(json.dumps({"kind": "patch", "size": 3, "pos": "top-left"}))
    (tmp_path / "t.yaml").write_text("kind: patch\nsize: 3\npos: top-left\n")
    a, b = parse_trigger(tmp_path / "t.json"), parse_trigger(str(tmp_path / "t.yaml"))
    assert np.array_equal(a.apply(grey), b.apply(grey))


def test_stamp_pil_keeps_mode():
    img = Image.fromarray(np.zeros((10, 10), np.uint8))
    out = parse_trigger("patch:size=2").stamp_pil(img)
    assert out.mode == "L" and np.asarray(out)[-1, -1] == 255


@pytest.mark.parametrize("spec,match", [
    ("sparkle:size=3", "unknown trigger kind"),
    ("patch:colour=white", "no field 'colour'"),
    ("patch:size=big", "must be N or WxH"),
    ("patch:fill=rainbow", "fill 'rainbow'"),
    ("patch:pos=middle", "pos 'middle'"),
    ("blend:alpha=2", "alpha must be in"),
    ("blend:alpha=x", "not a valid"),
    ("image:pattern=/nope.png,mask=/nope.png", "not found"),
    ("additive:eps=abc", "eps"),
    ("lsb:bits=9", "bits must be"),
    ("sig:delta=0", "sig delta"),
    ("sig:freq=-1", "sig freq"),
    ("sig:delta=loud", "not a valid"),
    ("patch:3", "no '='"),
    ("", "empty trigger spec"),
])
def test_bad_specs_are_clear_errors(spec, match):
    with pytest.raises(TriggerSpecError, match=match):
        parse_trigger(spec)


def test_patch_larger_than_image():
    with pytest.raises(ShapeMismatchError, match="does not fit"):
        parse_trigger("patch:size=40").apply(np.zeros((1, 28, 28, 1), np.uint8))
