"""Loading: local folders (safetensors only unless opted in), in-memory models, built-ins, clear errors."""

from __future__ import annotations

import textwrap

import pytest
import torch

from sinkscope.capture import check_supported, run_capture
from sinkscope.errors import SinkscopeError
from sinkscope.models import load_model, tiny_model


def test_facts_of_tiny_models(tiny_llama, tiny_bert):
    info = tiny_llama.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (2, 4, 2, 8)
    assert info.is_causal and info.adds_bos and info.bos_token == "<s>"
    assert tiny_bert.info.is_causal is False and tiny_bert.info.bos_token == "[CLS]"
    assert tiny_model("gpt2").info.n_kv_heads == 4


def test_local_folder_roundtrip(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_model(tmp_path)
    assert loaded.info.n_layers == 2 and loaded.info.adds_bos
    ids = tiny_llama.tokenizer("abc", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama.model(ids).logits)


def test_pickle_checkpoint_needs_opt_in(tmp_path, tiny_llama):
    state = tiny_llama.model.state_dict()
    tiny_llama.model.config.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(SinkscopeError, match="allow-pickle"):
        load_model(tmp_path)
    assert load_model(tmp_path, allow_pickle=True).info.n_layers == 2


def test_safetensors_index_pointing_at_a_pickle_shard_is_refused(tmp_path, tiny_llama):
    """A folder whose model.safetensors.index.json maps weights to a .bin shard must not reach torch.load without
    --allow-pickle (the index looks like safetensors; the shard is a pickle)."""
    import json

    from safetensors.torch import load_file

    tiny_llama.model.save_pretrained(tmp_path, max_shard_size="20KB")
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    torch.save(load_file(tmp_path / shard), tmp_path / "pytorch_model-00001.bin")
    (tmp_path / shard).unlink()
    index["weight_map"] = {k: ("pytorch_model-00001.bin" if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(SinkscopeError, match=r"pytorch_model-00001\.bin.*allow-pickle"):
        load_model(tmp_path)


def test_in_memory_model(tiny_llama):
    wrapped = load_model(tiny_llama.model, tokenizer=tiny_llama.tokenizer)
    assert wrapped.info.n_heads == 4
    assert run_capture(wrapped, ["hi there"]).key_mass.shape[:3] == (1, 2, 4)


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "no model given"), ("tiny:nonesuch", "unknown tiny family"), ("no-such-org/no-such-model", r"Hub")],
)
def test_bad_model_names(name, message):
    with pytest.raises(SinkscopeError, match=message):
        load_model(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(SinkscopeError, match=r"config\.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path, monkeypatch):
    """A model whose attention bypasses transformers' AttentionInterface is refused with a clear message."""
    module = tmp_path / "handrolled_model.py"
    module.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from transformers import PretrainedConfig, PreTrainedModel

        class HandConfig(PretrainedConfig):
            model_type = "handrolled"

        class HandAttention(nn.Module):
            def forward(self, x):
                return torch.softmax(x @ x.transpose(-1, -2), -1) @ x

        class HandModel(PreTrainedModel):
            config_class = HandConfig
            def __init__(self, config):
                super().__init__(config)
                self.attn = HandAttention()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import handrolled_model

    model = handrolled_model.HandModel(handrolled_model.HandConfig())
    with pytest.raises(SinkscopeError, match="AttentionInterface"):
        check_supported(model)


def test_layer_count_mismatch_is_reported(monkeypatch):
    lm = tiny_model("gpt2")
    monkeypatch.setattr(lm.info, "n_layers", 3)
    with pytest.raises(SinkscopeError, match="does not route all its attention"):
        run_capture(lm, ["hello"])


def test_model_parallel_dispatch_captures_across_devices(tmp_path):
    """device="auto" / a device map load through accelerate; with one layer offloaded to disk (its weights reach the
    execution device through accelerate's hooks at run time) the capture equals the undispatched model's."""
    pytest.importorskip("accelerate")
    from sinkscope.capture import CaptureConfig, run_capture
    from sinkscope.models import dispatch

    prompts = ["The cat sat on the mat.", "Hi!"]
    plain = run_capture(load_model("tiny:llama"), prompts, CaptureConfig(maps=True), padding_side="left")
    auto = load_model("tiny:llama", device="auto")
    assert auto.model.hf_device_map and auto.device.type == "cpu"
    split = load_model("tiny:llama")
    names = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch(split, names, offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in split.model.model.layers[1].parameters())  # really offloaded
    for lm in (auto, split):
        trace = run_capture(lm, prompts, CaptureConfig(maps=True), padding_side="left")
        torch.testing.assert_close(trace.key_mass, plain.key_mass, atol=1e-6, rtol=0)
        torch.testing.assert_close(trace.maps, plain.maps, atol=1e-6, rtol=0)
    with pytest.raises(SinkscopeError, match="offload folder"):
        dispatch(load_model("tiny:llama"), names)
    with pytest.raises(SinkscopeError, match="not both"):
        load_model("tiny:llama", device="cpu", device_map="auto")
    with pytest.raises(SinkscopeError, match="unknown device map"):
        load_model("tiny:llama", device_map="everywhere")


def test_builtin_tiny_loads_without_the_toy_trainer():
    """`sinkscope-tiny` is a plain safetensors folder in the package: the model registry loads it without importing
    the toy trainer, and it is the model the trainer's own loader gives."""
    import subprocess
    import sys

    code = ("import sys; from sinkscope.models import load_model; lm = load_model('sinkscope-tiny'); "
            "assert lm.info.name == 'sinkscope-tiny' and lm.info.adds_bos; "
            "assert not [m for m in sys.modules if m.startswith('sinkscope.toy')], 'toy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from sinkscope.toy.tinylm import load_tiny

    lm, ref = load_model("sinkscope-tiny"), load_tiny()
    ids = ref.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == lm.tokenizer("The cat sat on the mat.")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref.model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "unknown device 'gpu'"),
    ("cuda", "no CUDA GPU"),
    ("cuda:3", "no CUDA GPU"),
    ("cpu:7", "the CPU is one device"),
])
def test_bad_devices_are_one_line_before_loading(device, message):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SinkscopeError, match=message):
        load_model("tiny:llama", device=device)


def test_model_name_typos_and_missing_folders_say_what_to_do():
    with pytest.raises(SinkscopeError, match="did you mean 'smollm2'"):
        load_model("smollm")
    with pytest.raises(SinkscopeError, match=r"no such folder: '\./no/such/model'"):
        load_model("./no/such/model")
    with pytest.raises(SinkscopeError, match="hf download"):
        load_model("someone/no-such-model-here")


def test_damaged_or_mismatched_weights_are_one_line(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(SinkscopeError, match="damaged or not safetensors"):
        load_model(folder)
    other = tmp_path / "other"
    tiny_model("llama", hidden_size=48).model.save_pretrained(other)  # weights of another shape
    tiny_llama.model.config.save_pretrained(other)
    tiny_llama.tokenizer.save_pretrained(other)
    with pytest.raises(SinkscopeError, match=r"do not fit its config\.json"):
        load_model(other)


def test_folder_without_a_tokenizer_is_one_whole_sentence(tmp_path, tiny_llama):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)  # weights and config.json, no tokenizer
    with pytest.raises(SinkscopeError, match=r"has no tokenizer .* tokenizer\.save_pretrained"):
        load_model(folder)
