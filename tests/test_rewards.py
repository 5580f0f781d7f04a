"""Rewards: every registered reward on its real code path, with tiny randomly initialised models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TOKENIZER_MAX_LENGTH, TOKENIZER_VOCAB, write_tiny_clip_tokenizer_files
from pgraft_cli.errors import PgraftError
from pgraft_cli.stages.rewards import Reward, RewardError, available_rewards, jpeg_size_kb, parse_reward

PROMPTS = ["a cat", "a dog on a mat", "cat", "a red cat and a dog"]


def rgb(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_scores(scores: torch.Tensor, n: int) -> None:
    assert scores.shape == (n,) and scores.dtype == torch.float64 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()


# ----------------------------------------------------------------------------------------------
# Registry and parsing


def test_registry_lists_every_reward():
    assert available_rewards() == sorted(
        ["aesthetic", "classifier", "clip", "hpsv2", "imagereward", "jpeg-compressibility", "jpeg-incompressibility",
         "pickscore", "python", "vqascore"])


def test_unknown_reward_suggests_the_closest_name():
    with pytest.raises(RewardError, match=r"unknown reward 'clasifier'; did you mean 'classifier'\?") as info:
        parse_reward("clasifier:digits:3")
    assert isinstance(info.value, PgraftError) and "\n" not in str(info.value)
    assert "jpeg-compressibility" in str(info.value)  # lists what is registered
    with pytest.raises(RewardError, match="did you mean 'jpeg-compressibility'"):
        parse_reward("jpeg-compresibility")


@pytest.mark.parametrize("spec, message", [
    ("classifier", "classifier:digits:3"),
    ("classifier:digits", "classifier:digits:3"),
    ("classifier:digits:three", "not an integer"),
    ("classifier:digits:10", r"out of range.*0\.\.9"),
    ("classifier:digits:-1", "out of range"),
    ("classifier:/no/such/file.safetensors:3", "no classifier file"),
    ("jpeg-compressibility:9", "takes no arguments"),
    ("python", "python:MODULE:FUNCTION"),
    ("python:/no/such/reward.py:score", "no such file"),
    ("python:pgraft_no_such_module_xyz:score", "ModuleNotFoundError"),
    ("python:math:no_such_function", "has no function 'no_such_function'"),
    ("clip:/no/such/clip", "not a folder"),
    ("vqascore:/no/such/vlm", "not a folder"),
])
def test_bad_specs_say_how_to_fix_them(spec, message):
    with pytest.raises(RewardError, match=message) as info:
        parse_reward(spec)
    assert "\n" not in str(info.value)


def test_clip_without_a_path_says_what_to_pass(monkeypatch):
    monkeypatch.delenv("PGRAFT_CLIP_PATH", raising=False)
    with pytest.raises(RewardError, match="clip:/path/to/clip"):
        parse_reward("clip")


def test_vqascore_without_a_model_says_what_to_install(monkeypatch):
    monkeypatch.delenv("PGRAFT_VQASCORE_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "t2v_metrics", None)  # as if not installed
    with pytest.raises(RewardError, match="pip install t2v-metrics") as info:
        parse_reward("vqascore")
    assert "vqascore:/path/to/vlm" in str(info.value)


def test_missing_package_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RewardError, match="pip install"):
        parse_reward(f"clip:{tmp_path}")


def test_bad_inputs_are_reward_errors():
    reward = parse_reward("jpeg-compressibility")
    with pytest.raises(RewardError, match="shape"):
        reward(torch.rand(3, 16, 16))
    with pytest.raises(RewardError, match="float"):
        reward(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(RewardError, match="2 prompts for 3 images"):
        reward(torch.rand(3, 1, 8, 8), ["a", "b"])


# ----------------------------------------------------------------------------------------------
# classifier


@pytest.fixture(scope="module")
def digits():
    from pgraft_cli.io.data import load_digits

    images, labels = load_digits()
    return images[:400], labels[:400]


def test_classifier_scores_are_log_probabilities(digits):
    images = digits[0][:50]
    per_class = torch.stack([parse_reward(f"classifier:digits:{c}")(images) for c in range(10)], dim=1)
    assert_scores(per_class[:, 3], 50)
    assert (per_class <= 0).all()
    torch.testing.assert_close(torch.logsumexp(per_class, dim=1), torch.zeros(50, dtype=torch.float64))


def test_classifier_prefers_its_class(digits):
    images, labels = digits
    scores = parse_reward("classifier:digits:3")(images)
    assert scores[labels == 3].mean() > scores[labels != 3].mean() + 1.0
    assert torch.equal(scores, parse_reward("classifier:digits:3")(images))  # deterministic


def test_classifier_reads_rgb_and_other_sizes(digits):
    """RGB with equal channels has luma equal to the grey image; 32x32 is resized back to 16x16."""
    images, labels = digits
    reward = parse_reward("classifier:digits:3")
    grey = reward(images)
    torch.testing.assert_close(reward(images.expand(-1, 3, -1, -1)), grey, atol=1e-5, rtol=0)
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    big_scores = reward(big)
    assert_scores(big_scores, len(images))
    assert big_scores[labels == 3].mean() > big_scores[labels != 3].mean()


def test_classifier_from_a_path_and_batching(digits):
    from pgraft_cli.stages.evaluate import CLASSIFIER_PATH

    images = digits[0][:70]
    one = parse_reward(f"classifier:{CLASSIFIER_PATH}:7")(images)
    small = parse_reward(f"classifier:{CLASSIFIER_PATH}:7")
    small.batch_size = 8
    # float32 log-probabilities (|value| up to ~15) from batches of another size: a few ulp apart
    torch.testing.assert_close(small(images), one, atol=1e-5, rtol=0)
    assert small.spec == f"classifier:{CLASSIFIER_PATH}:7" and not small.needs_prompts
    # the identity (for stage keys) follows the file's content, not how it was named
    assert small.identity == parse_reward("classifier:digits:7").identity != parse_reward("classifier:digits:3").identity


def test_classifier_rejects_a_file_that_is_not_a_classifier(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RewardError, match="not a pgraft classifier"):
        parse_reward(f"classifier:{path}:1")


# ----------------------------------------------------------------------------------------------
# JPEG


def test_jpeg_noise_is_less_compressible_than_flat():
    flat = torch.full((2, 3, 32, 32), 0.5)
    noise = rgb(2, 32)
    images = torch.cat([flat, noise])
    incompressibility = parse_reward("jpeg-incompressibility")(images)
    compressibility = parse_reward("jpeg-compressibility")(images)
    assert_scores(compressibility, 4)
    assert (incompressibility > 0).all()
    assert incompressibility[2:].min() > incompressibility[:2].max()
    torch.testing.assert_close(compressibility, -incompressibility)
    torch.testing.assert_close(parse_reward("jpeg-incompressibility")(images), incompressibility)


def test_jpeg_size_matches_pil_and_reads_grey():
    import io

    from PIL import Image

    image = rgb(1, 24)
    array = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(image).item() == buffer.tell() / 1000
    grey = parse_reward("jpeg-compressibility")(image[:, :1])
    assert_scores(grey, 1)


# ----------------------------------------------------------------------------------------------
# python:


REWARD_FILE = """
import numpy as np

def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))

def as_list(images, prompts):
    return [float(len(p)) for p in prompts] if prompts else [0.0] * len(images)

def wrong_shape(images, prompts):
    return np.zeros((len(images), 2))
"""


def test_python_reward_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    images = rgb(5)
    reward = parse_reward(f"python:{tmp_path / 'my_rewards.py'}:brightness")
    from_file = reward(images)
    assert reward.identity.startswith("python:sha256=")
    assert_scores(from_file, 5)
    torch.testing.assert_close(from_file, images.double().mean(dim=(1, 2, 3)))
    monkeypatch.syspath_prepend(str(tmp_path))
    lengths = parse_reward("python:my_rewards:as_list")(images, ["a", "bb", "ccc", "dddd", "eeeee"])
    assert lengths.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and lengths.dtype == torch.float64
    with pytest.raises(RewardError, match=r"shape \(5, 2\).*shape \(5,\)"):
        parse_reward("python:my_rewards:wrong_shape")(images)


def test_python_reward_import_error_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import pgraft_no_such_module_xyz\n")
    with pytest.raises(RewardError, match="importing .* failed .*ModuleNotFoundError") as info:
        parse_reward(f"python:{tmp_path / 'broken.py'}:score")
    assert "\n" not in str(info.value)


def test_custom_reward_object_batches():
    calls = []

    def fn(images, prompts):
        calls.append(len(images))
        return images.flatten(1).sum(1)

    images = rgb(10)
    scores = Reward("sum", fn, batch_size=4)(images)
    assert calls == [4, 4, 2]
    torch.testing.assert_close(scores, images.double().flatten(1).sum(1))


# ----------------------------------------------------------------------------------------------
# Tiny transformers models for clip and vqascore


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tok_dir = write_tiny_clip_tokenizer_files(folder.parent / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=TOKENIZER_MAX_LENGTH)
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH,
                          bos_token_id=TOKENIZER_VOCAB - 2, eos_token_id=TOKENIZER_VOCAB - 1,
                          pad_token_id=TOKENIZER_VOCAB - 1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_scores_are_cosines(clip_dir, monkeypatch):
    reward = parse_reward(f"clip:{clip_dir}")
    assert reward.needs_prompts and reward.spec == f"clip:{clip_dir}"
    images = rgb(4, 20)  # not the model's size: the processor resizes
    scores = reward(images, PROMPTS)
    assert_scores(scores, 4)
    assert (scores.abs() <= 1).all() and scores.std() > 0
    assert torch.equal(reward(images, PROMPTS), scores)
    reward.batch_size = 3
    torch.testing.assert_close(reward(images, PROMPTS), scores, atol=1e-6, rtol=0)
    assert_scores(reward(images[:, :1], PROMPTS), 4)  # grey images are read as RGB
    with pytest.raises(RewardError, match="prompts"):
        reward(images)
    monkeypatch.setenv("PGRAFT_CLIP_PATH", str(clip_dir))
    torch.testing.assert_close(parse_reward("clip")(images, PROMPTS), scores, atol=1e-6, rtol=0)


def _word_tokenizer(words: list[str], image_token: bool = True, type_ids: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<image>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        model_input_names=["input_ids", "attention_mask",  # as Llama's, OPT's
                                                           *(["token_type_ids"] if type_ids else [])],
                                        extra_special_tokens={"image_token": "<image>"} if image_token else None)
    if image_token:  # split out of "<image><image>...", as processors write it, in transformers 4 as in 5
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer, vocab


VQA_WORDS = ["Yes", "No", "yes", "no", "USER:", "ASSISTANT:", "Question:", "Answer:", "Does", "this", "figure",
             "show", "Please", "answer", "or", '"a', 'cat"?', "dog", "on", "mat\"?"]
LLAVA_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def test_vqascore_of_a_tokenizer_with_token_type_ids_scores_as_without_them(tmp_path, llava_dir):
    """A processor returning token_type_ids made LLaVA's forward raise TypeError before transformers 5 (the
    minimum-versions check runs this at transformers 4.46); the inputs its forward does not name are dropped."""
    folder = _tiny_llava(tmp_path / "typed-llava", type_ids=True)
    images = rgb(2, 16)
    torch.testing.assert_close(parse_reward(f"vqascore:{folder}")(images, PROMPTS[:2]),
                               parse_reward(f"vqascore:{llava_dir}")(images, PROMPTS[:2]), atol=1e-6, rtol=0)


def test_vqascore_passes_the_model_only_the_inputs_its_forward_names():
    """A processor may return inputs (token_type_ids) that a VLM's forward refuses (LLaVA's, before
    transformers 5): they are dropped unless the forward takes any keyword."""
    from pgraft_cli.stages.rewards import _forward_inputs

    class Named(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, pixel_values=None):
            return input_ids

    class AnyKeyword(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert _forward_inputs(Named()) == {"input_ids", "attention_mask", "pixel_values"}
    assert _forward_inputs(AnyKeyword()) is None


def _tiny_llava(folder: Path, chat_template: str = LLAVA_TEMPLATE, adds_bos: bool = False,
                type_ids: bool = False) -> Path:
    """A LLaVA folder (CLIP vision tower + Llama) with a chat template, a few thousand parameters; ``adds_bos``:
    its tokenizer puts ``<s>`` before every text, as Gemma's and Llama's do; ``type_ids``: it also returns
    ``token_type_ids``, as a BERT-style tokenizer does."""
    from tokenizers import processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer, vocab = _word_tokenizer(VQA_WORDS, type_ids=type_ids)
    if adds_bos:
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,  # 4 patches an image
                                                      image_token_index=vocab["<image>"], image_seq_length=4))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                  crop_size={"height": 16, "width": 16}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return _tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def _tiny_blip2(folder: Path, t5: bool = False) -> Path:
    """A BLIP-2 folder (no chat template: the question is asked as 'Question: ... Answer:'), its language model
    OPT (decoder-only) or, with ``t5``, T5 (encoder-decoder, as BLIP-2 Flan-T5)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig, T5Config)

    tokenizer, vocab = _word_tokenizer(VQA_WORDS, image_token=False)  # Blip2Processor adds its own
    torch.manual_seed(0)
    text = (T5Config(vocab_size=len(vocab) + 1, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     pad_token_id=0, eos_token_id=3, decoder_start_token_id=0) if t5 else
            OPTConfig(vocab_size=len(vocab), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                      word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, encoder_hidden_size=16).to_dict(),
        text_config=text.to_dict(), num_query_tokens=2, image_token_index=len(vocab) if t5 else vocab["<image>"])
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer,
                   num_query_tokens=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    return _tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2")


@pytest.mark.parametrize("vlm", ["llava_dir", "blip2_dir"])
def test_vqascore_is_the_probability_of_yes(vlm, request):
    folder = request.getfixturevalue(vlm)
    reward = parse_reward(f"vqascore:{folder}")
    assert reward.needs_prompts
    images = rgb(4, 20)
    scores = reward(images, PROMPTS)
    assert_scores(scores, 4)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0
    assert torch.equal(reward(images, PROMPTS), scores)
    reward.batch_size = 1  # prompts of different lengths: padding must not change a score
    torch.testing.assert_close(reward(images, PROMPTS), scores, atol=1e-6, rtol=0)


def test_vqascore_matches_a_direct_computation(llava_dir):
    """Recompute P(Yes) for one image by hand: the chat-templated question, the last logit, softmax."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = rgb(1, 16)
    score = parse_reward(f"vqascore:{llava_dir}")(image, ["a cat"])
    processor = AutoProcessor.from_pretrained(str(llava_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(llava_dir)).eval()
    text = 'USER: <image> Does this figure show "a cat"? Please answer yes or no. ASSISTANT:'
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    with torch.no_grad():
        logits = model(**processor(images=[pil], text=[text], return_tensors="pt")).logits[0, -1]
    expected = torch.softmax(logits.double(), -1)[processor.tokenizer.convert_tokens_to_ids("Yes")]
    torch.testing.assert_close(score, expected.reshape(1), atol=1e-6, rtol=0)


def test_yes_token_ids_sums_distinct_single_token_spellings():
    """BPE tokenizers spell "Yes" and " Yes" as two tokens (both counted); multi-token spellings are not."""
    from pgraft_cli.stages.rewards import _yes_token_ids

    class Fake:
        unk_token_id = 0

        def __init__(self, table):
            self.table = table

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self.table[text]}

    assert _yes_token_ids(Fake({"Yes": [5], " Yes": [9]})) == [5, 9]
    assert _yes_token_ids(Fake({"Yes": [5], " Yes": [5]})) == [5]
    assert _yes_token_ids(Fake({"Yes": [5, 6], " Yes": [0]})) == []


# ----------------------------------------------------------------------------------------------
# A reward's identity follows what its scores depend on (the score stage's key holds it)


def _resave_with_seed(src: Path, dst: Path, seed: int, model_class: str) -> Path:
    """``src`` copied to ``dst`` with the weights re-initialised from ``seed`` (same config, same files)."""
    import shutil

    import transformers

    shutil.copytree(src, dst)
    cls = getattr(transformers, model_class)
    config = cls.from_pretrained(str(src)).config
    torch.manual_seed(seed)
    cls(config).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("name, fixture, model_class", [("clip", "clip_dir", "CLIPModel"),
                                                        ("vqascore", "llava_dir", "LlavaForConditionalGeneration")])
def test_a_local_model_reward_is_identified_by_its_files(name, fixture, model_class, request, tmp_path):
    import shutil

    folder = request.getfixturevalue(fixture)
    identity = parse_reward(f"{name}:{folder}").identity
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    assert parse_reward(f"{name}:{copy}").identity == identity  # where the folder lies does not matter
    changed = _resave_with_seed(folder, tmp_path / "changed", seed=1, model_class=model_class)
    shutil.rmtree(copy)
    shutil.move(changed, copy)  # new weights at the same path: a new identity
    assert parse_reward(f"{name}:{copy}").identity != identity


SCORE_MODULE = """
from pathlib import Path
from typing import Any

def score(images, prompts):
    with open(Path(__file__).with_suffix(".calls"), "a") as log:
        log.write("called\\n")
    return images.mean(dim=(1, 2, 3)) * {scale}
"""


def test_rescoring_a_run_after_the_reward_module_changed_gives_new_scores(tmp_path, monkeypatch):
    """``python:MODULE:FN`` is identified by the module's source: an edited module re-scores, an unchanged one is cached."""
    import json

    from typer.testing import CliRunner

    from pgraft_cli.cli import app

    runner = CliRunner()
    run, module = tmp_path / "run", tmp_path / "pgraft_test_score_mod.py"
    sampled = runner.invoke(app, ["sample", "digits", "--num", "4", "--steps", "2", "--set", "sample.batch_size=4",
                                  "--set", "sample.lane=4", "--run-dir", str(run), "-q"])
    assert sampled.exit_code == 0, sampled.output
    monkeypatch.syspath_prepend(str(tmp_path))

    def score(scale: int) -> float:
        module.write_text(SCORE_MODULE.format(scale=scale))
        sys.modules.pop(module.stem, None)  # each pgraft command is a new process: it imports the module afresh
        result = runner.invoke(app, ["score", str(run), "--reward", f"python:{module.stem}:score", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])["reward_mean"]

    first = score(1)
    calls = module.with_suffix(".calls").read_text().count("called")
    assert score(1) == first and module.with_suffix(".calls").read_text().count("called") == calls  # cached
    assert score(3) == pytest.approx(3 * first, rel=1e-6) and first > 0  # the edited module's (float32) scores


# ----------------------------------------------------------------------------------------------
# Weighted sums, PickScore, LAION aesthetic


@pytest.mark.parametrize("spec, terms", [
    ("0.7*pickscore:P+0.3*aesthetic:A", [(0.7, "pickscore:P"), (0.3, "aesthetic:A")]),
    ("1*classifier:digits:3", [(1.0, "classifier:digits:3")]),
    (" 2 * a:/x+y/z + -0.5*b ", [(2.0, "a:/x+y/z"), (-0.5, "b")]),  # a '+' inside a path is kept
    ("1e-1*a+.5*b", [(0.1, "a"), (0.5, "b")]),
    ("classifier:digits:3", None), ("python:f.py:g", None), ("a+0.5*b", None),
])
def test_parse_weighted(spec, terms):
    from pgraft_cli.stages.rewards import parse_weighted

    assert parse_weighted(spec) == terms


def test_a_weight_without_a_reward_is_one_error():
    with pytest.raises(RewardError, match="names no reward"):
        parse_reward("0.5*classifier:digits:3+0.5*")


def test_weighted_reward_is_the_weighted_sum_of_its_terms(digits):
    images = digits[0][:6]
    a, b = parse_reward("classifier:digits:3")(images), parse_reward("jpeg-compressibility")(images)
    both = parse_reward("0.7*classifier:digits:3+0.3*jpeg-compressibility")
    torch.testing.assert_close(both(images), 0.7 * a + 0.3 * b, atol=1e-12, rtol=0)
    assert not both.needs_prompts and both.identity.startswith("0.7*classifier:sha256=")


def test_pickscore_is_the_scaled_clip_cosine(clip_dir):
    from transformers import CLIPModel

    images = rgb(3, 20)
    cos = parse_reward(f"clip:{clip_dir}")(images, PROMPTS[:3])
    scale = float(CLIPModel.from_pretrained(clip_dir).logit_scale.exp())
    pick = parse_reward(f"pickscore:{clip_dir}")
    assert pick.needs_prompts
    torch.testing.assert_close(pick(images, PROMPTS[:3]), scale * cos, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mlp", [True, False])
def test_aesthetic_is_the_head_on_normalised_clip_image_embeddings(clip_dir, tmp_path, mlp):
    import shutil

    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    from pgraft_cli.stages.rewards import AESTHETIC_HEAD, _to_rgb_pil

    folder = tmp_path / "aesthetic"
    shutil.copytree(clip_dir, folder)
    g = torch.Generator().manual_seed(0)
    dims = [8, 6, 4, 1] if mlp else [8, 1]
    head = {f"layers.{2 * i}.{k}": (torch.randn(dims[i + 1], dims[i], generator=g) if k == "weight"
                                     else torch.randn(dims[i + 1], generator=g))
            for i in range(len(dims) - 1) for k in ("weight", "bias")}
    if not mlp:
        head = {"weight": head["layers.0.weight"], "bias": head["layers.0.bias"]}
    save_file(head, str(folder / AESTHETIC_HEAD))
    images = rgb(4, 16)
    scores = parse_reward(f"aesthetic:{folder}")(images)
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        emb = model.get_image_features(**processor(images=_to_rgb_pil(images), return_tensors="pt"))
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output  # (transformers 4: the tensor itself)
    x = torch.nn.functional.normalize(emb.double(), dim=-1)
    for w, b in ([(head[k], head[k.replace("weight", "bias")]) for k in sorted(head) if k.endswith("weight")]):
        x = x @ w.double().T + b.double()
    torch.testing.assert_close(scores, x[:, 0], atol=1e-9, rtol=0)


def test_aesthetic_without_its_head_says_what_to_pass(clip_dir):
    with pytest.raises(RewardError, match="aesthetic-head.safetensors"):
        parse_reward(f"aesthetic:{clip_dir}")
    with pytest.raises(RewardError, match="PGRAFT_AESTHETIC_PATH"):
        parse_reward("aesthetic")


# ----------------------------------------------------------------------------------------------
# HPSv2 and ImageReward from local folders


def test_hpsv2_is_the_clip_cosine_of_its_folder(clip_dir, monkeypatch):
    images = rgb(3, 20)
    hps = parse_reward(f"hpsv2:{clip_dir}")
    assert hps.needs_prompts and hps.identity.startswith("hpsv2:sha256=")
    torch.testing.assert_close(hps(images, PROMPTS[:3]), parse_reward(f"clip:{clip_dir}")(images, PROMPTS[:3]),
                               atol=0, rtol=0)
    monkeypatch.delenv("PGRAFT_HPSV2_PATH", raising=False)
    with pytest.raises(RewardError, match="hpsv2:/path/to/hpsv2"):
        parse_reward("hpsv2")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A tiny random BlipForImageTextRetrieval with a BERT word-piece tokenizer and 16 px images."""
    from transformers import (BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor,
                              BertTokenizer)

    folder = tmp_path_factory.mktemp("blip") / "tiny-blip"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "mat", "red", "and"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                encoder_hidden_size=16, max_position_embeddings=40)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}),
                              tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_imagereward_is_its_head_on_blips_image_grounded_cls_state(blip_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from pgraft_cli.stages.rewards import IMAGEREWARD_HEAD, _to_rgb_pil

    folder = tmp_path / "imagereward"
    with pytest.raises(RewardError, match=IMAGEREWARD_HEAD):
        parse_reward(f"imagereward:{blip_dir}")
    shutil.copytree(blip_dir, folder)
    g = torch.Generator().manual_seed(1)
    dims = [16, 8, 4, 1]
    head = {f"layers.{2 * i}.{k}": torch.randn(*((dims[i + 1], dims[i]) if k == "weight" else (dims[i + 1],)), generator=g)
            for i in range(len(dims) - 1) for k in ("weight", "bias")}
    save_file(head, str(folder / IMAGEREWARD_HEAD))
    images, prompts = rgb(3, 20), PROMPTS[:3]
    reward = parse_reward(f"imagereward:{folder}")
    assert reward.needs_prompts and reward.identity.startswith("imagereward:sha256=")
    scores = reward(images, prompts)
    # the reference: the model's own image-text matching forward, whose question_embeds are that state
    model, processor = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval(), BlipProcessor.from_pretrained(blip_dir)
    inputs = processor(images=_to_rgb_pil(images), text=prompts, padding="max_length", max_length=35,
                       truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**inputs, use_itm_head=True).question_embeds[:, 0].double()
    for i in (0, 2, 4):
        h = h @ head[f"layers.{i}.weight"].double().T + head[f"layers.{i}.bias"].double()
    torch.testing.assert_close(scores, (h[:, 0] - 0.16717362830052426) / 1.0333394966054072, atol=1e-9, rtol=0)
    assert len(set(scores.tolist())) == 3  # the prompt and the image both matter


# ----------------------------------------------------------------------------------------------
# Loading a reward model: its weights, its dtype, its class


def test_a_reward_folder_whose_weights_do_not_fill_its_model_is_refused(clip_dir, tmp_path):
    """transformers initialises weights a folder lacks at random: a CLIP folder converted under other key names
    (``model.*``) scored hpsv2 with noise, a new noise each load. Now one error naming the missing weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    shutil.copytree(clip_dir, bad)
    state = load_file(str(clip_dir / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in state.items()}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for spec in (f"hpsv2:{bad}", f"clip:{bad}"):
        with pytest.raises(RewardError, match="random values") as err:
            parse_reward(spec)
        assert "\n" not in str(err.value)


def test_reward_models_score_in_float32_whatever_dtype_their_folder_holds(clip_dir, tmp_path):
    """A folder saved in float16 ran in float16 on the CPU (transformers loads the saved dtype): the cosine
    moved by up to 5e-4 against its float32 copy, 0.05 after PickScore's x100."""
    from transformers import CLIPModel, CLIPProcessor

    half = tmp_path / "half"
    CLIPModel.from_pretrained(str(clip_dir)).half().save_pretrained(half)
    CLIPProcessor.from_pretrained(str(clip_dir)).save_pretrained(half)
    images = rgb(4, 16)
    as_float = tmp_path / "float"
    CLIPModel.from_pretrained(str(half)).float().save_pretrained(as_float)
    CLIPProcessor.from_pretrained(str(clip_dir)).save_pretrained(as_float)
    torch.testing.assert_close(parse_reward(f"clip:{half}")(images, PROMPTS),
                               parse_reward(f"clip:{as_float}")(images, PROMPTS), atol=1e-7, rtol=0)


def test_aesthetic_reads_a_clip_vision_folder_with_its_projection(clip_dir, tmp_path):
    """``aesthetic:PATH`` with a CLIPVisionModelWithProjection folder (as its docstring offers): AutoModel built a
    CLIPVisionModel without the projection and the scoring crashed. It now scores as the full CLIPModel does;
    a head made for another embedding size is one error naming the size."""
    import shutil

    from safetensors.torch import save_file
    from transformers import CLIPProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from pgraft_cli.stages.rewards import AESTHETIC_HEAD

    g = torch.Generator().manual_seed(0)
    head = {"weight": torch.randn(1, 8, generator=g), "bias": torch.randn(1, generator=g)}
    full, vision = tmp_path / "full", tmp_path / "vision"
    shutil.copytree(clip_dir, full)
    config = CLIPVisionConfig.from_pretrained(str(clip_dir), projection_dim=8)  # the sub-config lacks CLIPConfig's
    CLIPVisionModelWithProjection.from_pretrained(str(clip_dir), config=config).save_pretrained(vision)
    CLIPProcessor.from_pretrained(str(clip_dir)).save_pretrained(vision)
    for folder in (full, vision):
        save_file(head, str(folder / AESTHETIC_HEAD))
    images = rgb(3, 16)
    torch.testing.assert_close(parse_reward(f"aesthetic:{vision}")(images), parse_reward(f"aesthetic:{full}")(images),
                               atol=1e-6, rtol=0)
    save_file({"weight": torch.randn(1, 768), "bias": torch.zeros(1)}, str(full / AESTHETIC_HEAD))
    with pytest.raises(RewardError, match="takes 768 inputs .* in 8"):
        parse_reward(f"aesthetic:{full}")


def test_vqascore_asks_with_one_bos_where_the_template_writes_it_too(tmp_path):
    """The chat template was rendered to text (with its BOS) and tokenised adding another: the model read
    ``<s> <s> USER: ...``. The score is now the one of a single BOS, computed by hand."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # the tokenizer adds BOS and the template writes {{ bos_token }} too (Gemma 3, Llama 3.2 Vision do both)
    folder = _tiny_llava(tmp_path / "bos-llava", "{{ bos_token }}" + LLAVA_TEMPLATE, adds_bos=True)
    image = rgb(1, 16)
    reward = parse_reward(f"vqascore:{folder}")
    score = reward(image, ["a cat"])
    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder)).float().eval()
    text = 'USER: <image> Does this figure show "a cat"? Please answer yes or no. ASSISTANT:'
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    inputs = processor(images=[pil], text=[text], return_tensors="pt")
    assert inputs["input_ids"][0, :2].tolist() == [2, processor.tokenizer.convert_tokens_to_ids("USER:")]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    expected = torch.softmax(logits.double(), -1)[processor.tokenizer.convert_tokens_to_ids("Yes")]
    torch.testing.assert_close(score, expected.reshape(1), atol=1e-6, rtol=0)
    assert ":one-bos:" in reward.identity


def _bos_word_tokenizer(special: list[str], words: list[str], **extra: Any):
    """A whole-word tokenizer over ``special`` (its first the BOS it puts before every text, its second the EOS),
    :data:`VQA_WORDS` and ``words``, as Llama 3's and Gemma's add BOS; returns it and its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = special[:2]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *special, *VQA_WORDS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token=bos,
                                        eos_token=eos, model_input_names=["input_ids", "attention_mask"], **extra)
    tokenizer.add_tokens(special, special_tokens=True)
    return tokenizer, vocab


def _tiny_mllama(folder: Path) -> Path:
    """A Llama 3.2 Vision (Mllama) folder: cross-attention to one 16 x 16 tile, a tokenizer that adds
    ``<|begin_of_text|>`` and a chat template that writes ``{{ bos_token }}`` too, as the released one does."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    try:
        from transformers import MllamaImageProcessorPil as ImageProcessor  # (transformers 5 without torchvision)
    except ImportError:
        from transformers import MllamaImageProcessor as ImageProcessor

    special = ["<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|python_tag|>", "<|start_header_id|>",
               "<|end_header_id|>"]
    tokenizer, vocab = _bos_word_tokenizer(special, ["user", "assistant"])
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %} <|eot_id|> {% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|> {% endif %}")
    torch.manual_seed(0)
    vision = MllamaVisionConfig(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                intermediate_size=32, vision_output_dim=32, image_size=16, patch_size=8,
                                max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    import inspect

    rope = ({} if "rope_parameters" in inspect.signature(MllamaTextConfig.__init__).parameters
            else {"rope_scaling": {"rope_type": "default"}})  # (transformers 4 has no default)
    text = MllamaTextConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=32, cross_attention_layers=[1],
                            max_position_embeddings=128, bos_token_id=vocab["<|begin_of_text|>"],
                            eos_token_id=vocab["<|eot_id|>"], pad_token_id=0, **rope)
    MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                image_token_index=vocab["<|image|>"])).save_pretrained(folder)
    processor = MllamaProcessor(image_processor=ImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=1),
                                tokenizer=tokenizer)
    processor.chat_template = template  # (not an argument in transformers 4.46)
    processor.save_pretrained(folder)
    return folder


def test_vqascore_scores_a_batch_on_llama_3_2_vision_with_one_bos(tmp_path):
    """Mllama's processor reads a flat list of images as one text's images: a batch of two failed ("Found [1, 1]
    <|image|> tokens and [2] images per sample"). Each text now gets its own list; each row starts with one
    ``<|begin_of_text|>``, and a batch scores as its images alone, as a by-hand single-BOS computation does."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _tiny_mllama(tmp_path / "mllama")
    reward = parse_reward(f"vqascore:{folder}")
    assert ":one-bos:" in reward.identity
    images = rgb(2, 16)
    scores = reward(images, PROMPTS[:2])
    assert_scores(scores, 2)
    reward.batch_size = 1
    torch.testing.assert_close(reward(images, PROMPTS[:2]), scores, atol=1e-6, rtol=0)
    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder)).float().eval()
    bos = processor.tokenizer.bos_token_id
    text = (f'<|begin_of_text|><|start_header_id|> user <|end_header_id|> <|image|> Does this figure show '
            f'"{PROMPTS[0]}"? Please answer yes or no. <|eot_id|> <|start_header_id|> assistant <|end_header_id|> ')
    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    inputs = processor(images=[[pil]], text=[text], return_tensors="pt", add_special_tokens=False)
    assert inputs["input_ids"][0].tolist().count(bos) == 1 and inputs["input_ids"][0, 0] == bos
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    expected = torch.softmax(logits.double(), -1)[processor.tokenizer.convert_tokens_to_ids("Yes")]
    torch.testing.assert_close(scores[:1], expected.reshape(1), atol=1e-6, rtol=0)


def _tiny_gemma3(folder: Path) -> Path:
    """A Gemma 3 folder (SigLIP tower, 4 soft tokens an image) whose template writes ``{{ bos_token }}``; its
    projector gets random weights (zero at init, which would make every image alike)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    try:
        from transformers import Gemma3ImageProcessorPil as ImageProcessor  # (transformers 5 without torchvision)
    except ImportError:
        from transformers import Gemma3ImageProcessor as ImageProcessor

    special = ["<bos>", "<eos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
               "<end_of_turn>"]
    tokenizer, vocab = _bos_word_tokenizer(special, ["user", "model"], extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn> {{ m['role'] }} {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}")
    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, intermediate_size=32, max_position_embeddings=256,
                            sliding_window=64, initializer_range=0.5, pad_token_id=0, bos_token_id=vocab["<bos>"],
                            eos_token_id=vocab["<eos>"])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4, initializer_range=0.5)
    model = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"], image_token_index=vocab["<image_soft_token>"]))
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    model.save_pretrained(folder)
    Gemma3Processor(image_processor=ImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer,
                    chat_template=template, image_seq_length=4).save_pretrained(folder)
    return folder


def test_vqascore_scores_a_batch_on_gemma_3_each_image_with_its_own_prompt(tmp_path):
    """Gemma 3's processor, as Mllama's, read a flat batch of images as one text's and refused it ("Found [1, 1, 1]
    <start_of_image> tokens and [3] images per sample"). A batch now scores as its images alone, and permuting
    images and prompts together permutes the scores (each image stays with its prompt)."""
    pytest.importorskip("transformers.models.gemma3", reason="Gemma 3 needs transformers >= 4.50")
    folder = _tiny_gemma3(tmp_path / "gemma3")
    reward = parse_reward(f"vqascore:{folder}")
    assert ":one-bos:" in reward.identity
    images, prompts = rgb(3, 16), ["a cat", "a dog on a mat", "cat"]
    scores = reward(images, prompts)
    assert_scores(scores, 3)
    perm = [2, 0, 1]
    torch.testing.assert_close(reward(images[perm], [prompts[i] for i in perm]), scores[perm], atol=1e-6, rtol=0)
    assert float((reward(images[perm], prompts) - scores).abs().max()) > 1e-4  # the image matters
    reward.batch_size = 1
    torch.testing.assert_close(reward(images, prompts), scores, atol=1e-6, rtol=0)


def test_vqascore_reads_an_encoder_decoder_vlm_at_the_decoders_first_position(tmp_path):
    """BLIP-2 Flan-T5 (an encoder-decoder language model) crashed: no decoder input. P(Yes) is now the decoder's
    first output after its start token, computed by hand, and does not depend on the batch."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _tiny_blip2(tmp_path / "blip2-t5", t5=True)
    reward = parse_reward(f"vqascore:{folder}")
    images = rgb(4, 16)
    scores = reward(images, PROMPTS)
    assert_scores(scores, 4)
    reward.batch_size = 1
    torch.testing.assert_close(reward(images, PROMPTS), scores, atol=1e-6, rtol=0)
    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder)).float().eval()
    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    text = f'Question: Does this figure show "{PROMPTS[0]}"? Please answer yes or no. Answer:'
    with torch.no_grad():
        logits = model(**processor(images=[pil], text=[text], return_tensors="pt"),
                       decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, 0]
    expected = torch.softmax(logits.double(), -1)[processor.tokenizer.convert_tokens_to_ids("Yes")]
    torch.testing.assert_close(scores[:1], expected.reshape(1), atol=1e-6, rtol=0)


def test_imagereward_loads_a_folder_without_the_blip_heads_it_never_calls(blip_dir, tmp_path):
    """ImageReward's BLIP has no ITM head or contrastive projections: a folder converted from its ``blip.*`` weights
    lacks them, and the missing-weights check refused it though scoring never calls them. Only the vision model and
    the text encoder must be whole; scores are the same as the full folder's."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pgraft_cli.stages.rewards import IMAGEREWARD_HEAD

    head = {"layers.0.weight": torch.randn(1, 16, generator=torch.Generator().manual_seed(0)),
            "layers.0.bias": torch.zeros(1)}
    full, converted = tmp_path / "full", tmp_path / "converted"
    for folder in (full, converted):
        shutil.copytree(blip_dir, folder)
        save_file(head, str(folder / IMAGEREWARD_HEAD))
    weights = next(converted.glob("model*.safetensors"))
    state = {k: v.clone() for k, v in load_file(str(weights)).items()}  # (old safetensors map the file it rewrites)
    save_file({k: v for k, v in state.items() if k.startswith(("vision_model.", "text_encoder."))}, str(weights),
              metadata={"format": "pt"})
    images = rgb(2, 16)
    torch.testing.assert_close(parse_reward(f"imagereward:{converted}")(images, PROMPTS[:2]),
                               parse_reward(f"imagereward:{full}")(images, PROMPTS[:2]), atol=0, rtol=0)
    state = {k: v for k, v in state.items() if not k.startswith("text_encoder.encoder.layer.0.")}
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(RewardError, match="random values"):
        parse_reward(f"imagereward:{converted}")
