"""The fixed digits split: disjoint, complete, sized 60 / 20 / 20 %, stratified, deterministic."""

import hashlib

import pytest
import torch

from pgraft_cli.io.data import ALIASES, digits_split, load_data, load_digits
from pgraft_cli.errors import PgraftError


def test_splits_are_disjoint_cover_everything_and_have_the_documented_sizes():
    _, labels = load_digits(size=8)
    parts = {name: set(digits_split(labels, name).tolist()) for name in ("train", "judge", "test")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 1078, "judge": 359, "test": 360}
    assert not parts["train"] & parts["judge"] and not parts["train"] & parts["test"]
    assert not parts["judge"] & parts["test"]
    assert parts["train"] | parts["judge"] | parts["test"] == set(range(1797))


def test_splits_are_stratified_by_label():
    _, labels = load_digits(size=8)
    for name, share in (("train", 0.6), ("judge", 0.2), ("test", 0.2)):
        counts = labels[digits_split(labels, name)].bincount(minlength=10)
        expected = share * labels.bincount(minlength=10)
        assert (counts - expected).abs().max() <= 1, (name, counts, expected)


def test_split_follows_the_documented_hash_rule():
    """Recomputed here from the rule in the docstring, for one label: the split is the rule, not a run."""
    _, labels = load_digits(size=8)
    members = [i for i in range(len(labels)) if int(labels[i]) == 7]
    order = sorted(members, key=lambda i: hashlib.sha256(f"pgraft-digits-split:{i}".encode()).hexdigest())
    n_train, n_judge = round(0.6 * len(order)), round(0.2 * len(order))
    test = set(digits_split(labels, "test").tolist())
    assert set(order[n_train + n_judge:]) == {i for i in test if int(labels[i]) == 7}
    assert set(order[:n_train]) <= set(digits_split(labels, "train").tolist())


def test_split_is_deterministic_and_aliases_load_it():
    images, labels = load_digits()
    a, b = digits_split(labels, "judge"), digits_split(labels.clone(), "judge")
    assert torch.equal(a, b)
    assert set(ALIASES) == {"digits", "digits-train", "digits-judge", "digits-test"}
    test = load_data("digits-test", (1, 16, 16))
    assert torch.equal(test, images[digits_split(labels, "test")])
    assert load_data("digits", (1, 16, 16)).shape == (1797, 1, 16, 16)
    test_images, test_labels = load_digits(split="test")
    assert torch.equal(test_images, test) and torch.equal(test_labels, labels[digits_split(labels, "test")])


def test_unknown_split_is_a_clear_error():
    _, labels = load_digits(size=8)
    with pytest.raises(PgraftError, match="unknown digits split 'val'"):
        digits_split(labels, "val")
    with pytest.raises(PgraftError, match="digits-train"):
        load_data("digits-val", (1, 16, 16))


def test_iter_data_streams_the_same_images_as_load_data(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from pgraft_cli.io.data import iter_data

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(7):
        pixels = (torch.rand(20, 24, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    tensor_file = tmp_path / "imgs.safetensors"
    save_file({"images": (torch.rand(9, 3, 8, 8, generator=rng) * 255).to(torch.uint8)}, str(tensor_file))
    for spec, shape in ((str(folder), (3, 8, 8)), (str(tensor_file), (3, 8, 8)), ("digits-test", (1, 16, 16))):
        batches = list(iter_data(spec, shape, batch=4))
        assert all(len(b) <= 4 for b in batches)
        assert torch.equal(torch.cat(batches), load_data(spec, shape)), spec
    with pytest.raises(PgraftError, match="images of shape"):  # checked before any batch is asked for
        iter_data(str(tensor_file), (1, 8, 8))


def test_digits_are_scikit_learns_without_importing_it():
    """The digits read from scikit-learn's file equal ``sklearn.datasets.load_digits`` bit for bit."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images, labels = load_digits(size=8)
    assert torch.equal(images, (torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0).clamp(0, 1))
    assert torch.equal(labels, torch.tensor(bunch.target, dtype=torch.long))


def test_a_16_bit_grey_png_is_read_at_its_values_not_clipped_to_white(tmp_path):
    """PIL's convert("L") clips 16-bit values at 255: a ramp with mean 0.5 read as 0.996."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "wide"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(folder / "ramp.png")
    assert Image.open(folder / "ramp.png").mode.startswith("I")
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535.0)
    grey = load_data(str(folder), (1, 16, 16))
    torch.testing.assert_close(grey[0, 0], expected, rtol=0, atol=1e-6)  # same size: no resampling
    rgb = load_data(str(folder), (3, 8, 8))  # resized in float; every channel the grey one
    assert abs(float(rgb.mean()) - 0.5) < 0.01 and torch.equal(rgb[0, 0], rgb[0, 2]) and 0 <= rgb.min() <= rgb.max() <= 1


def test_unreadable_data_and_text_files_are_one_line_errors(tmp_path):
    import numpy as np

    from pgraft_cli.pipelines.skeleton import prompt_list

    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([{"a": 1}, None], dtype=object))
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 16, 16), np.uint8))
    for path, message in ((objects, "array is not numbers"), (empty, "holds no images")):
        with pytest.raises(PgraftError, match=message) as err:
            load_data(str(path), (1, 16, 16))
        assert "\n" not in str(err.value)
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(PgraftError, match=r"--prompts .*prompts.txt is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        prompt_list(None, latin)
